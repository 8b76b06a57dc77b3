"""The one batched HF generator: greedy answers equal plain batch-1 `generate`, whatever the batch size."""

import itertools

import pytest
import torch

from pipeline.vlm.data import read_samples
from pipeline.vlm.generation import GenerationSettings, HFGenerator
from pipeline.vlm.prompting import render

FAMILIES = [("qwen2-vl-tiny", "qwen2"), ("llava-tiny", "mistral")]


def easy_vqa_prompts(vlm, n):
    """(prompt text, images) of the first n easy-VQA test questions: several question lengths."""
    samples = list(itertools.islice(read_samples("easy-vqa:test"), n))
    return [(render(vlm.processor, s.messages, add_generation_prompt=True), [spec.load() for spec in s.images])
            for s in samples]


def plain_batch1(vlm, prompts, max_new_tokens):
    """Reference: one prompt per `generate` call, no padding at all, cut at the first end-of-turn id.

    Returns the answers and each prompt's length in tokens."""
    stops = set(vlm.end_of_turn)
    texts, lengths = [], []
    for text, images in prompts:
        inputs = vlm.processor(text=[text], images=images, return_tensors="pt")
        with torch.inference_mode():
            out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=vlm.end_of_turn, pad_token_id=vlm.pad_id)
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
    assert generator.decode(ids + generator.end_of_turn + after + [generator.pad_id] * 3) == "circle"
    assert generator.decode(ids) == "circle"


def test_batch_size_must_be_positive(tiny_vlm):
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        HFGenerator(tiny_vlm("qwen2-vl-tiny", "qwen2"), GenerationSettings(), batch_size=0)
