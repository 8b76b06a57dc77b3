"""Shared fixtures: synthetic teachers and small caches written through the real store API."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.teacher_head import write_teacher_head
from pipeline.store.writer import CacheWriter

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def teacher() -> SyntheticTeacher:
    return SyntheticTeacher(hidden_size=64, vocab_size=500, seed=0)


def write_cache(root: Path, teacher: SyntheticTeacher, ids: list[str], manifest=None, writer_id="w0", **kw):
    """Write `ids` (every 3rd with question features) plus the head; return the samples written.

    `layers=(1, 2)` (passed on to synthetic_manifest) also stores those intermediate layers."""
    manifest = manifest or synthetic_manifest(hidden_size=64, vocab_size=500, **kw)
    samples = list(teacher.samples(ids, manifest.topk.k, question_every=3, layers=manifest.layers))
    with CacheWriter(root, manifest, writer_id) as writer:
        for sample in samples:
            writer.add(sample)
    write_teacher_head(root, teacher.head)
    return samples


@pytest.fixture
def small_cache(tmp_path, teacher):
    root = tmp_path / "cache"
    samples = write_cache(root, teacher, [f"s{i:03d}" for i in range(40)])
    return root, samples


from tests.tiny_fixtures import tiny_image, tiny_vlm, tiny_vlm_dir  # noqa: E402,F401  (session-built tiny VLMs)
from tests.student_fixtures import pair_cache, pair_student  # noqa: E402,F401  (teacher/student pair + cache)
