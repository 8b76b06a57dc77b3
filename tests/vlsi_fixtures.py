"""A same-tokenizer teacher/student pair with a cache that holds intermediate layers, for --method kd and vlsi:
a Qwen2-VL teacher (tiny BPE tokenizer, d=128, 4 decoder layers, sharpened head; layers 1, 2, 3 cached) and a
smaller Qwen2-VL student with the same tokenizer (d=64, 3 decoder layers).

The fixtures are imported by name into tests/test_kd.py and tests/test_vlsi.py; what they build is kept per
session here, so the two modules share one dump.
"""

import pytest

from pipeline.vlm.models import load_vlm

TEACHER_LAYERS = (1, 2, 3)
_BUILT: dict = {}


def _once(key, build):
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def same_teacher_dir(tmp_path_factory):
    def build():
        from pipeline.vlm.tiny import build_tiny_vlm
        from tests.student_fixtures import _sharpen_head

        folder = build_tiny_vlm("qwen2-vl-tiny", tmp_path_factory.mktemp("same-teacher") / "qwen2-vl", tokenizer="tiny-bpe",
                                seed=1)
        _sharpen_head(folder, 30.0)  # a random head is near uniform; a trained one is not
        return folder

    return _once("teacher", build)


@pytest.fixture(scope="session")
def same_cache(tmp_path_factory, same_teacher_dir):
    def build():
        from pipeline.dump import dump_teacher
        from pipeline.dump_config import DumpConfig

        out = tmp_path_factory.mktemp("same-cache")
        dump_teacher(DumpConfig(model=str(same_teacher_dir), data="easy-vqa:train", out=str(out), limit=8, top_k=16,
                                layers=TEACHER_LAYERS), progress=False)
        return out

    return _once("cache", build)


@pytest.fixture(scope="session")
def same_cache_without_layers(tmp_path_factory, same_teacher_dir):
    def build():
        from pipeline.dump import dump_teacher
        from pipeline.dump_config import DumpConfig

        out = tmp_path_factory.mktemp("same-cache-no-layers")
        dump_teacher(DumpConfig(model=str(same_teacher_dir), data="easy-vqa:train", out=str(out), limit=4, top_k=16),
                     progress=False)
        return out

    return _once("cache-no-layers", build)


@pytest.fixture(scope="session")
def same_student(tmp_path_factory):
    def build():
        from pipeline.vlm.tiny import build_tiny_vlm

        folder = build_tiny_vlm("qwen2-vl-tiny", tmp_path_factory.mktemp("same-student") / "qwen2-vl-small",
                                tokenizer="tiny-bpe", seed=2, hidden_size=64, intermediate_size=256, num_hidden_layers=3)
        return load_vlm(folder)

    return _once("student", build)


def test_the_pair_shares_its_tokenizer_and_the_cache_has_the_layers(same_cache, same_student):
    from pipeline.dump_config import tokenizer_fingerprint
    from pipeline.store.reader import CacheReader

    manifest = CacheReader(same_cache).manifest
    assert manifest.teacher.tokenizer_fingerprint == tokenizer_fingerprint(same_student.tokenizer)
    assert tuple(manifest.layers) == TEACHER_LAYERS and manifest.teacher.hidden_size == 128
    assert same_student.model.config.get_text_config().hidden_size == 64
