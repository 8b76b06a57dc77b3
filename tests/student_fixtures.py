"""A heterogeneous teacher/student pair with a small real cache: Qwen2-VL teacher (real Qwen2 tokenizer,
d=128, sharpened head) -> LLaVA/Llama student (real Mistral tokenizer, d=64)."""

import shutil

import pytest

from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.vlm.models import load_vlm


@pytest.fixture(scope="session")
def pair_cache(tmp_path_factory, tiny_vlm_dir):
    out = tmp_path_factory.mktemp("cache")
    teacher = tmp_path_factory.mktemp("teacher") / "qwen2-vl"
    shutil.copytree(tiny_vlm_dir("qwen2-vl-tiny", "qwen2"), teacher)  # real Qwen2 tokenizer, 152k vocabulary
    _sharpen_head(teacher, 30.0)
    dump_teacher(DumpConfig(model=str(teacher), data="easy-vqa:train", out=str(out), limit=8, top_k=16,
                            question_features_fraction=0.5), progress=False)
    return out


def _sharpen_head(folder, factor):
    """A random teacher's head gives near-uniform distributions; a trained one does not. Scale it."""
    from safetensors.torch import load_file, save_file

    (path,) = folder.glob("*.safetensors")
    tensors = load_file(str(path))
    (key,) = [k for k in tensors if "lm_head" in k]
    tensors[key] = tensors[key] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def pair_student(tiny_vlm_dir):
    # LLaVA (Llama) student with the real Mistral tokenizer, hidden 64 vs the teacher's 128
    from pipeline.vlm.tiny import build_tiny_vlm

    folder = tiny_vlm_dir("llava-tiny", "mistral").parent / "llava-small"
    if not folder.exists():
        build_tiny_vlm("llava-tiny", folder, tokenizer="mistral", hidden_size=64, intermediate_size=256)
    return load_vlm(folder)


