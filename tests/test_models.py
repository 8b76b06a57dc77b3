"""Loading VLMs (pipeline.vlm.models) and the tiny offline families (pipeline.vlm.tiny)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline.vlm.models import (
    MODEL_ALIASES,
    ModelLoadError,
    _resolve_dtype,
    body_forward,
    end_of_turn_ids,
    head_logits,
    lm_head_and_scaling,
    load_vlm,
    resolve_model,
)
from pipeline.vlm.processors import load_processor, save_processor
from pipeline.vlm.tiny import build_tiny_vlm, real_tokenizer
from tests.tiny_fixtures import TINY_FAMILIES, tiny_image, tiny_inputs, tiny_vlm, tiny_vlm_dir  # noqa: F401

FAMILY_IDS = [f"{name}+{tok}" for name, tok in TINY_FAMILIES]
QUESTION, ANSWER = "What shape is in the image?", "circle"
# image placeholder tokens after the processor expands the template's placeholder for one 64x64 image
EXPECTED_IMAGE_TOKENS = {"qwen2-vl-tiny": 4, "internvl-tiny": 64, "llava-tiny": 64, "llava-onevision-tiny": 136}
MODEL_TYPES = {"qwen2-vl-tiny": "qwen2_vl", "internvl-tiny": "internvl", "llava-tiny": "llava",
               "llava-onevision-tiny": "llava_onevision"}


@pytest.fixture(params=TINY_FAMILIES, ids=FAMILY_IDS)
def family(request, tiny_vlm):
    name, tok = request.param
    return name, tok, tiny_vlm(name, tok)


def test_family_and_vocab(family):
    name, _, vlm = family
    assert vlm.family == MODEL_TYPES[name]
    assert vlm.dtype == torch.float32 and not vlm.model.training
    assert vlm.model.config.get_text_config()._attn_implementation == "sdpa"
    rows = vlm.model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and len(vlm.tokenizer) <= rows < len(vlm.tokenizer) + 64


def test_body_head_equals_logits(family, tiny_image):
    name, _, vlm = family
    inputs = tiny_inputs(vlm, tiny_image, QUESTION, ANSWER)
    image_token = vlm.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == EXPECTED_IMAGE_TOKENS[name]
    head, scale, softcap = lm_head_and_scaling(vlm.model)
    assert head is vlm.model.get_output_embeddings() and scale == 1.0 and softcap is None
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
        hidden = body_forward(vlm.model, **inputs)
    assert hidden.shape == (*inputs["input_ids"].shape, vlm.model.config.get_text_config().hidden_size)
    torch.testing.assert_close(head(hidden), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_logits(vlm.model, hidden), logits, atol=1e-5, rtol=1e-5)


def test_generate(family, tiny_image):
    _, _, vlm = family
    inputs = tiny_inputs(vlm, tiny_image, QUESTION)
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_end_of_turn(family):
    name, tok_kind, vlm = family
    tok = vlm.tokenizer
    expected = tok.convert_tokens_to_ids("</s>" if tok_kind == "mistral" else "<|im_end|>")
    assert end_of_turn_ids(tok, vlm.processor.chat_template) == [expected]
    assert end_of_turn_ids(tok) == [expected]  # the tokenizer carries the same template
    # the rendered answer is followed by exactly that token
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}]},
         {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    end = max(i for i in range(len(ids)) if ids[i : i + len(answer_ids)] == answer_ids) + len(answer_ids)
    assert ids[end] == expected
    assert expected in vlm.model.generation_config.eos_token_id


def test_processor_round_trip(family, tiny_image, tmp_path):
    _, _, vlm = family
    save_processor(vlm.processor, tmp_path)
    again = load_processor(tmp_path)
    assert type(again).__name__ == type(vlm.processor).__name__
    assert again.chat_template == vlm.processor.chat_template
    assert again.image_processor.to_dict() == vlm.processor.image_processor.to_dict()
    assert json.loads(again.to_json_string()) == json.loads(vlm.processor.to_json_string())
    first, second = tiny_inputs(vlm, tiny_image, QUESTION, ANSWER), tiny_inputs(
        SimpleNamespace(processor=again), tiny_image, QUESTION, ANSWER)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_real_qwen2_tokenizer_ids(tiny_vlm):
    tok = tiny_vlm("qwen2-vl-tiny", "qwen2").tokenizer
    known = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
             "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {t: tok.convert_tokens_to_ids(t) for t in known} == known
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [
        151644, 872, 198, 6023, 151645]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok("Größe 12 ✓")["input_ids"]) == "Größe 12 ✓"


def test_real_mistral_tokenizer_ids(tiny_vlm):
    tok = tiny_vlm("llava-tiny", "mistral").tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert tok("[INST]", add_special_tokens=False)["input_ids"] == [733, 16289, 28793]
    assert tok("hi")["input_ids"][0] == 1  # BOS added, as the Mistral tokenizer does
    assert len(real_tokenizer("mistral")) == 32000


def test_tiny_bpe_tokenizes_easy_vqa(tiny_vlm):
    tok = tiny_vlm("internvl-tiny", "tiny-bpe").tokenizer
    assert len(tok) <= 1024
    for word in ("circle", "triangle", "rectangle", "yes", "no", " image", " contain", " shape"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.decode(tok("Does the image contain a teal triangle?")["input_ids"]) == (
        "Does the image contain a teal triangle?")


def test_load_bfloat16(tiny_vlm_dir, tiny_image):
    vlm = load_vlm(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), dtype="bfloat16")
    assert vlm.dtype == torch.bfloat16 and next(vlm.model.parameters()).dtype == torch.bfloat16
    inputs = tiny_inputs(vlm, tiny_image, QUESTION, ANSWER)  # fp32 pixel_values: the model casts them
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
        assert torch.equal(head_logits(vlm.model, body_forward(vlm.model, **inputs)), logits)


def test_resolve_dtype():
    assert _resolve_dtype("auto", "cpu", None) == torch.float32
    assert _resolve_dtype("auto", "cuda:0", None) == torch.bfloat16
    assert _resolve_dtype("float16", "cpu", None) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        _resolve_dtype("int8", "cpu", None)


def test_aliases(tmp_path):
    assert resolve_model("qwen2-vl-2b") == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve_model("Qwen2-VL-72B") == "Qwen/Qwen2-VL-72B-Instruct"
    assert resolve_model("qwen2.5-vl-7b") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_model("internvl2.5-78b") == "OpenGVLab/InternVL2_5-78B-MPO-hf"
    assert resolve_model("llava-onevision-0.5b") == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    for size in (1, 2, 4, 8, 26, 38, 78):
        assert f"internvl2.5-{size}b" in MODEL_ALIASES
    assert resolve_model(tmp_path) == str(tmp_path.resolve())
    assert resolve_model("someone/some-vlm") == "someone/some-vlm"


def test_bad_names_fail_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert issubclass(ModelLoadError, ValueError)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not a known alias"):
        load_vlm("qwen2-vl-13b")
    with pytest.raises(ModelLoadError, match="not an existing local folder"):
        load_vlm(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load_vlm("nobody-genrecal/no-such-vlm")
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="unknown tiny VLM"):
        build_tiny_vlm("gpt-tiny", tmp_path)


def test_cached_hub_id_loads_offline(tiny_vlm_dir, tmp_path, monkeypatch):
    """A hub id found in the HF cache loads without touching the network when the hub is unreachable."""
    import shutil

    import huggingface_hub.constants

    import pipeline.vlm.models

    repo = tmp_path / "hub" / "models--genrecal-test--tiny-internvl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pipeline.vlm.models, "_hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    vlm = load_vlm("genrecal-test/tiny-internvl")
    assert time.monotonic() - start < 10
    assert vlm.path == "genrecal-test/tiny-internvl" and vlm.family == "internvl"
    assert type(vlm.processor).__name__ == "InternVLProcessor"


def test_head_scaling_and_softcap():
    head = torch.nn.Linear(4, 6, bias=False)
    text = SimpleNamespace(logit_scale=0.5, final_logit_softcapping=3.0)
    config = SimpleNamespace(get_text_config=lambda: text)
    model = SimpleNamespace(config=config, get_output_embeddings=lambda: head)
    assert lm_head_and_scaling(model) == (head, 0.5, 3.0)
    hidden = torch.randn(2, 5, 4)
    torch.testing.assert_close(head_logits(model, hidden), torch.tanh(head(hidden) * 0.5 / 3.0) * 3.0)
    text.logit_scale, text.final_logit_softcapping, text.logits_scaling = None, None, 4.0  # Granite divides
    assert lm_head_and_scaling(model)[1:] == (0.25, None)
