"""Writers killed mid-shard resume cleanly; concurrent writers into one cache give the union."""

import os
import signal
import subprocess

import numpy as np

from pipeline.store.reader import CacheReader
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.teacher_head import write_teacher_head
from pipeline.store.verify import verify_cache
from pipeline.store.writer import CacheWriter
from tests.conftest import PYTHON, REPO

SCRIPT = str(REPO / "tests" / "writer_proc.py")


def run_writer(cache, writer_id, first, last, *extra):
    return subprocess.Popen(
        [PYTHON, SCRIPT, str(cache), writer_id, str(first), str(last), *extra],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def reference_cache(root, first, last):
    """The same samples written by one uninterrupted in-process writer."""
    teacher = SyntheticTeacher(64, 500, seed=0)
    manifest = synthetic_manifest()
    with CacheWriter(root, manifest, "ref") as writer:
        for sample in teacher.samples([f"s{i:04d}" for i in range(first, last)], manifest.topk.k, question_every=3):
            writer.add(sample)
    write_teacher_head(root, teacher.head)
    return CacheReader(root)


def assert_same_contents(a: CacheReader, b: CacheReader):
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a.get(sid), b.get(sid)
        for name in ("target_ids", "features", "logsumexp", "topk_ids", "topk_logprobs", "tail_logmass"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (sid, name)
        assert (x.question_features is None) == (y.question_features is None)
        if x.question_features is not None:
            assert np.array_equal(x.question_features, y.question_features), sid


def test_sigkill_mid_shard_then_rerun_gives_every_sample_once(tmp_path):
    cache = tmp_path / "cache"
    proc = run_writer(cache, "w0", 0, 60, "--hang-in-commit", "3")
    line = proc.stdout.readline()
    assert line.startswith("IN_COMMIT"), line
    tmp_folder = line.split()[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(tmp_folder)  # the half-committed shard is left behind...
    partial = CacheReader(cache)
    assert 0 < len(partial) < 60  # ...and invisible to readers
    assert any("leftover temporary folder" in w for w in verify_cache(cache).warnings)

    rerun = run_writer(cache, "w0", 0, 60)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "DONE" in out
    assert not os.path.exists(tmp_folder)  # the rerun cleaned its own leftovers
    write_teacher_head(cache, SyntheticTeacher(64, 500, seed=0).head)

    resumed = CacheReader(cache)
    assert len(resumed) == 60 and not resumed.duplicates
    report = verify_cache(cache)
    assert report.ok, report.problems
    assert not report.warnings
    assert_same_contents(resumed, reference_cache(tmp_path / "ref", 0, 60))


def test_two_writer_processes_at_once_give_the_union(tmp_path):
    cache = tmp_path / "cache"
    procs = [run_writer(cache, "w0", 0, 50), run_writer(cache, "w1", 50, 100)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "DONE 50" in out
    write_teacher_head(cache, SyntheticTeacher(64, 500, seed=0).head)
    reader = CacheReader(cache)
    assert len(reader) == 100 and not reader.duplicates
    assert {reader.indexes[n].writer_id for n in reader.shards} == {"w0", "w1"}
    report = verify_cache(cache)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert_same_contents(reader, reference_cache(tmp_path / "ref", 0, 100))
