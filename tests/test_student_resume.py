"""A run killed between checkpoints and resumed logs every step once; a training run opens the cache once."""

import json

import pytest

from pipeline.store.reader import CacheReader
from student.metrics_log import MetricsLog, read_metrics
from student.train import train_stage
from tests.test_student_train import config


class Killed(Exception):
    """Stands for a kill -9: the process stops with what it wrote on disk and no checkpoint."""


def test_a_killed_and_resumed_run_logs_each_step_once_with_the_uninterrupted_losses(tmp_path, pair_cache, pair_student,
                                                                                   monkeypatch):
    def cfg(name):
        return config(pair_cache, pair_student, tmp_path / name, 1, steps=9, save_every=3)

    whole = train_stage(cfg("whole"), progress=False)
    log_one_step = MetricsLog.write

    def log_then_die_after_step_7(self, record):
        log_one_step(self, record)
        if record["step"] == 7:
            raise Killed

    monkeypatch.setattr(MetricsLog, "write", log_then_die_after_step_7)
    with pytest.raises(Killed):
        train_stage(cfg("split"), progress=False)
    monkeypatch.undo()
    stage = tmp_path / "split" / "stage1"
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3, 4, 5, 6, 7]  # logged past the step-6 checkpoint
    train_stage(cfg("split"), resume=True, progress=False)
    resumed = read_metrics(stage)
    assert [r["step"] for r in resumed] == list(range(1, 10))
    for a, b in zip(whole, resumed, strict=True):
        for term in ("ce", "kl", "total"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), (a["step"], term)


def test_the_log_keeps_rows_up_to_the_resumed_step_and_purges_tensorboard_after_it(tmp_path, monkeypatch):
    folder = tmp_path / "stage1"
    folder.mkdir()
    rows = [json.dumps({"step": s, "total": float(s)}) for s in range(1, 8)]
    (folder / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 8, "tot')  # the kill cut the last line short
    writers = []

    class Writer:
        def __init__(self, logdir, purge_step):
            self.logdir, self.purge_step, self.scalars = logdir, purge_step, []
            writers.append(self)

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

        def close(self):
            pass

    monkeypatch.setattr("student.metrics_log._tensorboard_writer", Writer)
    log = MetricsLog(folder, tensorboard=True, resume_step=6)
    assert [r["step"] for r in read_metrics(folder)] == [1, 2, 3, 4, 5, 6]
    assert writers[0].purge_step == 7 and writers[0].logdir == tmp_path / "tensorboard" / "stage1"
    log.write({"step": 7, "total": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(folder)] == [1, 2, 3, 4, 5, 6, 7]
    assert writers[0].scalars == [("total", 0.5, 7)]
    MetricsLog(folder, resume_step=0).close()  # a fresh start in an old stage folder: nothing of the old run stays
    assert read_metrics(folder) == []


def test_a_training_run_opens_the_cache_once(tmp_path, pair_cache, pair_student, monkeypatch):
    opened = []
    open_reader = CacheReader.__init__

    def counting(self, *args, **kwargs):
        opened.append(args)
        open_reader(self, *args, **kwargs)

    monkeypatch.setattr(CacheReader, "__init__", counting)
    cfg = config(pair_cache, pair_student, tmp_path / "run", 1, steps=2, save_every=1)
    train_stage(cfg, progress=False, stop_after=1)  # a checkpoint at every step
    assert len(opened) == 1
    train_stage(cfg, resume=True, progress=False)  # the resume check reads the identity of the same reader
    assert len(opened) == 2


def test_an_fsdp_run_resumes_only_with_fsdp_and_a_plain_one_only_without(tmp_path, pair_cache, pair_student):
    import dataclasses

    import torch

    from student.checkpoint import STATE_DIR, load_resume_state, source_identity

    cfg = config(pair_cache, pair_student, tmp_path / "run", 1, steps=3)
    train_stage(cfg, progress=False, stop_after=1)  # a plain run's checkpoint after step 1
    stage = tmp_path / "run" / "stage1"
    identity = source_identity(cfg, CacheReader(pair_cache).manifest)
    assert load_resume_state(stage, cfg, identity)["step"] == 1
    with pytest.raises(ValueError, match="was trained without --fsdp; resume it the same way"):
        load_resume_state(stage, dataclasses.replace(cfg, fsdp=True), identity)
    path = stage / STATE_DIR / "state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "fsdp": True}, path)  # the same checkpoint as an --fsdp run writes it
    assert load_resume_state(stage, dataclasses.replace(cfg, fsdp=True), identity)["step"] == 1
    with pytest.raises(ValueError, match="was trained with --fsdp; resume it the same way"):
        train_stage(cfg, resume=True, progress=False)
