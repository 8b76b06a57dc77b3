"""Session-scoped tiny VLMs (random weights, real tokenizers) for tests.

Use from a test module with `from tests.tiny_fixtures import *  # noqa: F403`, or register the module
once in tests/conftest.py with `pytest_plugins = ["tests.tiny_fixtures"]`.

    tiny_vlm_dir("qwen2-vl-tiny", "qwen2")  -> Path of a saved folder (built once per session)
    tiny_vlm("llava-tiny", "mistral")       -> LoadedVLM (loaded once per session, fp32, CPU)
    tiny_image                              -> 64x64 RGB PIL image (a red circle on white, easy-VQA style)
    tiny_inputs(vlm, image, question, answer=None) -> processor inputs of one chat turn
"""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

# (family, tokenizer) pairs the suite exercises: real Qwen2, real Mistral and tiny-BPE tokenizers.
TINY_FAMILIES = [("qwen2-vl-tiny", "qwen2"), ("internvl-tiny", "tiny-bpe"), ("llava-tiny", "mistral"),
                 ("llava-onevision-tiny", "tiny-bpe")]


def make_tiny_image(color=(220, 30, 30)) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=color)
    return image


def tiny_messages(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def tiny_inputs(vlm, image, question: str, answer: str | None = None):
    """Processor inputs (return_tensors="pt") for one user turn with `image`, plus the answer if given."""
    text = vlm.processor.apply_chat_template(
        tiny_messages(question, answer), add_generation_prompt=answer is None, tokenize=False
    )
    return vlm.processor(images=[image], text=[text], return_tensors="pt")


@pytest.fixture(scope="session")
def tiny_image() -> Image.Image:
    return make_tiny_image()


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """Factory: tiny_vlm_dir(name, tokenizer) -> folder, built once per session."""
    from pipeline.vlm.tiny import build_tiny_vlm

    built = {}

    def get(name: str, tokenizer: str):
        if (name, tokenizer) not in built:
            folder = tmp_path_factory.mktemp(f"{name}-{tokenizer}")
            built[name, tokenizer] = build_tiny_vlm(name, folder, tokenizer=tokenizer, seed=0)
        return built[name, tokenizer]

    return get


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir):
    """Factory: tiny_vlm(name, tokenizer) -> LoadedVLM through `load_vlm(folder)`, loaded once per session."""
    from pipeline.vlm.models import load_vlm

    loaded = {}

    def get(name: str, tokenizer: str):
        if (name, tokenizer) not in loaded:
            loaded[name, tokenizer] = load_vlm(tiny_vlm_dir(name, tokenizer), dtype="float32", device="cpu")
        return loaded[name, tokenizer]

    return get
