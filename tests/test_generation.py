"""The one batched HF generator: greedy answers equal plain batch-1 `generate`, whatever the batch size.
Both backends sample with the model's generation config plus the same overrides and stop at the same ids."""

import itertools
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from pipeline.vlm.data import read_samples
from pipeline.vlm.generation import (GenerationSettings, HFGenerator, VLLMGenerator, effective_sampling, model_sampling,
                                     stop_token_ids, vllm_dtype)
from pipeline.vlm.models import load_vlm
from pipeline.vlm.prompting import render

FAMILIES = [("qwen2-vl-tiny", "qwen2"), ("llava-tiny", "mistral")]


def easy_vqa_prompts(vlm, n):
    """(prompt text, images) of the first n easy-VQA test questions: several question lengths."""
    samples = list(itertools.islice(read_samples("easy-vqa:test"), n))
    return [(render(vlm.processor, s.messages, add_generation_prompt=True), [spec.load() for spec in s.images])
            for s in samples]


def plain_batch1(vlm, prompts, max_new_tokens, **generate_kwargs):
    """Reference: one prompt per `generate` call, no padding at all, cut at the first end-of-turn or eos id.

    Returns the answers and each prompt's length in tokens."""
    stops = set(vlm.end_of_turn) | {vlm.tokenizer.eos_token_id}
    texts, lengths = [], []
    for text, images in prompts:
        inputs = vlm.processor(text=[text], images=images, return_tensors="pt")
        with torch.inference_mode():
            out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(stops), pad_token_id=vlm.pad_id, **generate_kwargs)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        texts.append(vlm.tokenizer.decode(new[:end], skip_special_tokens=True).strip())
        lengths.append(inputs["input_ids"].shape[1])
    return texts, lengths


@pytest.mark.parametrize("name, tokenizer", FAMILIES)
def test_batched_greedy_answers_equal_batch_1(tiny_vlm, name, tokenizer):
    vlm = tiny_vlm(name, tokenizer)
    prompts = easy_vqa_prompts(vlm, 7)
    expected, lengths = plain_batch1(vlm, prompts, max_new_tokens=8)
    assert len(set(lengths)) > 1  # one batch holds prompts of different lengths: left padding is exercised
    assert any(expected)  # random weights write something: the comparison is not vacuous
    settings = GenerationSettings(max_new_tokens=8)
    for batch_size in (1, 3, 7):
        assert HFGenerator(vlm, settings, batch_size).generate(prompts) == expected, batch_size


def test_padding_side_is_restored_and_answers_keep_the_prompts_order(tiny_vlm):
    vlm = tiny_vlm("qwen2-vl-tiny", "qwen2")
    prompts = easy_vqa_prompts(vlm, 4)
    side = vlm.tokenizer.padding_side
    generator = HFGenerator(vlm, GenerationSettings(max_new_tokens=4), batch_size=4)
    together = generator.generate(prompts)
    assert vlm.tokenizer.padding_side == side  # the dump's feature pass shares this tokenizer
    assert together == [generator.generate([p])[0] for p in prompts]
    assert generator.generate(prompts[::-1]) == together[::-1]


def test_decode_stops_at_the_first_end_of_turn(tiny_vlm):
    vlm = tiny_vlm("qwen2-vl-tiny", "qwen2")
    generator = HFGenerator(vlm, GenerationSettings())
    ids = vlm.tokenizer.encode("circle", add_special_tokens=False)
    after = vlm.tokenizer.encode(" square", add_special_tokens=False)
    assert set(vlm.end_of_turn) <= set(generator.stop_ids)
    assert generator.decode(ids + vlm.end_of_turn + after + [generator.pad_id] * 3) == "circle"
    assert generator.decode(ids) == "circle"


def test_batch_size_must_be_positive(tiny_vlm):
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        HFGenerator(tiny_vlm("qwen2-vl-tiny", "qwen2"), GenerationSettings(), batch_size=0)


# -- sampling settings: the model's generation config, then ours -----------------------------------------------


def test_effective_sampling_starts_from_the_generation_config_and_applies_the_overrides():
    model = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3, eos_token_id=[7, 8])
    greedy = effective_sampling(GenerationSettings(max_new_tokens=9), model, [5, 7])
    # greedy is our default whatever the model says; the repetition penalty applies to greedy decoding too
    assert greedy == {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                      "repetition_penalty": 1.3, "seed": 0, "stop_token_ids": [5, 7]}
    sampled = effective_sampling(GenerationSettings(temperature=0.9, top_p=0.5, seed=4), model, [5])
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["repetition_penalty"]) == (0.9, 0.5, 20, 1.3)
    ours = effective_sampling(GenerationSettings(temperature=1.0, sampling_top_k=3, repetition_penalty=1.0), model, [5])
    assert (ours["top_k"], ours["repetition_penalty"], ours["top_p"]) == (3, 1.0, 0.8)
    # an empty generation config: neutral values, never HF's global defaults (top_k=50)
    bare = effective_sampling(GenerationSettings(temperature=1.0), GenerationConfig(), [5])
    assert (bare["top_k"], bare["top_p"], bare["min_p"], bare["repetition_penalty"]) == (0, 1.0, 0.0, 1.0)
    assert effective_sampling(GenerationSettings(temperature=1.0), None, [5]) == bare


def test_stop_ids_are_end_of_turn_plus_every_eos():
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert stop_token_ids([9], tokenizer, GenerationConfig(eos_token_id=[3, 9])) == [2, 3, 9]
    assert stop_token_ids([9], tokenizer, GenerationConfig(eos_token_id=4)) == [2, 4, 9]
    assert stop_token_ids([9], SimpleNamespace(eos_token_id=None), None) == [9]


@pytest.fixture(scope="module")
def penalised_teacher(tiny_vlm_dir, tmp_path_factory):
    """A tiny teacher whose generation_config.json asks for a strong repetition penalty (and sampling values)."""
    folder = tmp_path_factory.mktemp("penalised") / "teacher"
    shutil.copytree(tiny_vlm_dir("qwen2-vl-tiny", "qwen2"), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, temperature=0.6, top_p=0.7, top_k=11, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder, load_vlm(folder, dtype="float32", device="cpu")


class RecordingEngine:
    """Stands in for vllm.LLM: records what it is sent, answers like LLM.generate."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" answer to {r['prompt']} ")]) for r in requests]


def test_both_backends_sample_with_the_generation_config_and_the_same_overrides(penalised_teacher):
    folder, vlm = penalised_teacher
    settings = GenerationSettings(max_new_tokens=8)
    hf = HFGenerator(vlm, settings)
    assert hf.sampling["repetition_penalty"] == 5.0 and hf.sampling["temperature"] == 0.0
    assert set(vlm.end_of_turn) <= set(hf.sampling["stop_token_ids"])
    # the vLLM side reads the folder (no HF model loaded) and must arrive at the same values
    assert model_sampling(str(folder), settings) == hf.sampling
    engine = RecordingEngine()
    vllm = VLLMGenerator(str(folder), settings, engine=engine, make_params=dict)
    assert vllm.sampling == hf.sampling
    vllm.generate([("p", [])])
    params = engine.calls[0][1]
    assert params == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                      "repetition_penalty": 5.0, "seed": 0, "stop_token_ids": hf.sampling["stop_token_ids"]}


def test_hf_answers_apply_the_generation_config_penalty(penalised_teacher, tiny_vlm):
    _, vlm = penalised_teacher
    prompts = easy_vqa_prompts(vlm, 5)
    got = HFGenerator(vlm, GenerationSettings(max_new_tokens=8), batch_size=5).generate(prompts)
    penalised, _ = plain_batch1(vlm, prompts, 8, repetition_penalty=5.0)
    plain, _ = plain_batch1(vlm, prompts, 8, repetition_penalty=1.0)
    assert got == penalised
    assert got != plain  # the penalty changes these answers: the comparison above can tell it was applied


def test_vllm_requests_and_engine_arguments():
    engine = RecordingEngine()
    settings = GenerationSettings(max_new_tokens=12, seed=3)
    sampling = effective_sampling(settings, None, [7])
    gen = VLLMGenerator("folder", settings, max_images=3, dtype="auto", max_model_len=512, sampling=sampling,
                        engine=engine, make_params=dict)
    image = object()
    assert gen.generate([("p1", [image]), ("p2", []), ("p3", [image, image])]) == ["answer to p1", "answer to p2", "answer to p3"]
    requests, _ = engine.calls[0]
    assert requests == [{"prompt": "p1", "multi_modal_data": {"image": image}}, {"prompt": "p2"},
                        {"prompt": "p3", "multi_modal_data": {"image": [image, image]}}]
    args = gen.engine_args
    assert (args["dtype"], args["max_model_len"], args["limit_mm_per_prompt"], args["seed"]) == ("bfloat16", 512, {"image": 3}, 3)


def test_vllm_dtype_names():
    assert [vllm_dtype(d) for d in ("auto", "bf16", "float32", "fp16")] == ["bfloat16", "bfloat16", "float32", "float16"]
    with pytest.raises(ValueError, match="'int8' not understood"):
        vllm_dtype("int8")
