"""`student train` / `student eval` options and the errors that must come before any model loads."""

import dataclasses
import shutil

import pytest
from click.testing import CliRunner

from schemas.dataclass_io import field_docs
from student.cli import main
from student.cli_options import NOT_OPTIONS
from student.config import LossConfig, TrainConfig


def _params():
    return {p.name: p for p in main.commands["train"].params}


@pytest.mark.parametrize("cls", [TrainConfig, LossConfig])
def test_every_config_field_is_an_option_with_its_docstring_and_default(cls):
    params, docs = _params(), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in NOT_OPTIONS:
            assert f.name not in params
            continue
        param = params[f.name]
        assert docs[f.name] and param.help.endswith(docs[f.name]), f.name
        if f.default is not dataclasses.MISSING:
            assert param.default == f.default, f.name


def test_options_without_help_before_now_have_it_and_defaults_are_shown():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    flat = " ".join(out.split())
    for flag, text in [("--steps", "Optimizer steps of this stage"), ("--rec-depth", "Recalibrator decoder blocks"),
                       ("--rec-init", "copy: the student's last decoder layers"),
                       ("--num-workers", "[default: 2]"), ("--train-vision-encoder", "Stage 1 trains the Recalibrator only")]:
        assert flag in flat and text in flat[flat.index(flag):][:400], flag


@pytest.fixture
def captured(monkeypatch):
    """Run `student train` up to the config: the TrainConfig it would train with."""
    seen = []
    monkeypatch.setattr("student.train.train_stage", lambda cfg, **kw: seen.append((cfg, kw)) or [])
    return seen


def test_cli_builds_the_same_config_as_the_dataclass_defaults(tmp_path, captured):
    args = ["train", "--cache", str(tmp_path), "--student", "s", "--out", str(tmp_path / "run"), "--stage", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (cfg, kw), = captured
    assert cfg == TrainConfig(cache=str(tmp_path), student="s", out=str(tmp_path / "run"), stage=1)
    assert kw == {"resume": False, "progress": True}


def test_cli_flags_reach_their_fields(tmp_path, captured):
    args = ["train", "--cache", str(tmp_path), "--student", "s", "--out", str(tmp_path / "run"), "--stage", "2",
            "--no-regularizer", "--ce-weight", "0.5", "--teacher-distribution", "topk", "--rec-init", "random",
            "--num-workers", "0", "--tensorboard", "--from-student", "--data-limit", "7", "--resume", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (cfg, kw), = captured
    assert (cfg.loss.regularizer, cfg.loss.ce_weight, cfg.loss.teacher_distribution) == (False, 0.5, "topk")
    assert (cfg.rec_init, cfg.num_workers, cfg.tensorboard, cfg.from_student, cfg.data_limit) == ("random", 0, True, True, 7)
    assert cfg.loss.kl_weight == LossConfig().kl_weight and kw == {"resume": True, "progress": False}
    bad = CliRunner().invoke(main, args[:9] + ["--rec-init", "zeros"])
    assert bad.exit_code == 2 and "zeros" in bad.output


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks failed")

    monkeypatch.setattr("student.train.load_vlm", refuse)


def _train(tmp_path, cache, stage, *extra):
    args = ["train", "--cache", str(cache), "--student", "unused-student", "--out", str(tmp_path / "run"),
            "--stage", str(stage), "--steps", "1", "--no-progress", *extra]
    return CliRunner().invoke(main, args)


def test_a_folder_that_is_not_a_cache_fails_before_the_student_loads(tmp_path, no_model_loads):
    (tmp_path / "not-a-cache").mkdir()
    result = _train(tmp_path, tmp_path / "not-a-cache", 1)
    assert result.exit_code == 2, result.output
    assert "manifest.json: file not found; is this a cache folder?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_teacher_head_fails_before_the_student_loads(tmp_path, pair_cache, no_model_loads):
    cache = tmp_path / "cache"
    shutil.copytree(pair_cache, cache)
    (cache / "teacher" / "head.safetensors").unlink()
    result = _train(tmp_path, cache, 1)
    assert result.exit_code == 2 and "the teacher head is missing" in result.stderr, result.output


@pytest.mark.parametrize("stage,previous", [(2, 1), (3, 2)])
def test_a_missing_previous_stage_fails_before_the_student_loads(tmp_path, pair_cache, no_model_loads, stage, previous):
    result = _train(tmp_path, pair_cache, stage)
    assert result.exit_code == 2, result.output
    assert f"run --stage {previous} first, or pass --from-student" in result.stderr


def test_eval_on_a_run_folder_names_its_last_stage(tmp_path):
    run = tmp_path / "run"
    for stage in ("stage1", "stage2", "stage3"):
        (run / stage).mkdir(parents=True)
        (run / stage / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["eval", "--model", str(run), "--data", "easy-vqa:test", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "is a training run folder" in result.stderr and f"--model {run / 'stage3'}" in result.stderr


def test_eval_out_help_names_the_default_file():
    flat = " ".join(CliRunner().invoke(main, ["eval", "--help"]).output.split())
    assert "MODEL/eval/<data>[-limitN][-fromK].json" in flat and "easy-vqa-test-limit200.json" in flat
