"""`--config FILE.yaml` for `student train`, `student check` and `pipeline dump-teacher`: the order in which
defaults, the file, its stage block and the command line win; errors that name the key, its line and the nearest
name; the saved OUT/stageN/config.yaml reruns a stage with the same metrics."""

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main as pipeline_main
from pipeline.config_file import ConfigFileError, config_yaml, from_nested, read_config_file
from pipeline.dump_config import DumpConfig
from pipeline.run_metrics import METRICS_FILE
from student.cli import main
from student.cli_options import CHOICES, LIBRARY_ONLY
from student.config import LossConfig, TrainConfig

# metrics that measure the machine, not the run
TIMINGS = {"tokens_per_s", "loader_wait_share", "peak_memory_mb", "seconds", "step_seconds"}


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def captured(monkeypatch):
    """Run `student train` up to the config: the TrainConfigs it would train with."""
    seen = []
    monkeypatch.setattr("student.train.train_stage", lambda cfg, **kw: seen.append(cfg) or [])
    return seen


def test_defaults_then_file_then_stage_block_then_command_line(tmp_path, captured):
    recipe = write(tmp_path / "r.yaml", f"""
cache: {tmp_path}
student: s
out: {tmp_path / 'run'}
lr: 2e-4              # YAML 1.1 would read this as a string; it is a number here
fsdp: true
loss:
  kl_weight: 2
  ce_weight: 0.25
stages:
  1: {{steps: 5, batch_size: 4}}
  2: {{steps: 7, loss: {{ce_weight: 0.5}}}}
""")
    for args in (["--stage", "1"], ["--stage", "2", "--steps", "9", "--no-fsdp", "--kl-weight", "3"]):
        result = CliRunner().invoke(main, ["train", "--config", recipe, *args])
        assert result.exit_code == 0, result.output
    one, two = captured
    assert (one.steps, one.batch_size, one.lr, one.fsdp, one.loss.kl_weight, one.loss.ce_weight) == (5, 4, 2e-4, True,
                                                                                                    2.0, 0.25)
    # stage 2: its block's ce_weight over the top level's, the command line over both; batch_size its default
    assert (two.steps, two.batch_size, two.fsdp, two.loss.kl_weight, two.loss.ce_weight) == (9, 8, False, 3.0, 0.5)
    assert two.loss.student_ce_weight == LossConfig().student_ce_weight and two.seed == 0


def test_the_command_line_fills_what_the_file_leaves_out_and_required_options_come_from_either(tmp_path, captured):
    partial = write(tmp_path / "p.yaml", f"cache: {tmp_path}\nstudent: s\n")
    ok = CliRunner().invoke(main, ["train", "--config", partial, "--out", str(tmp_path / "o"), "--stage", "1"])
    assert ok.exit_code == 0, ok.output
    assert captured[0] == TrainConfig(cache=str(tmp_path), student="s", out=str(tmp_path / "o"), stage=1)
    missing = CliRunner().invoke(main, ["train", "--config", partial, "--stage", "1"])
    assert missing.exit_code == 2 and "--out" in missing.output


@pytest.mark.parametrize("text,line,message", [
    ("student: s\nloss:\n  kl_wieght: 2\n", 3, "loss.kl_wieght: unknown key 'kl_wieght' for LossConfig; did you mean "
                                               "kl_weight?"),
    ("student: s\nbatch-size: 4\n", 2, "did you mean batch_size?"),
    ("student: s\nkl_weight: 2\n", 2, "kl_weight is a field of loss; nest it there"),
    ("student: s\n\nsteps: ten\n", 3, "steps: expected an integer, got a string 'ten'"),
    ("student: s\nfsdp: 1\n", 2, "fsdp: expected true or false, got an integer 1"),
    ("method: genrecl\n", 1, "method: 'genrecl' is not one of genrecal, uld, kd, vlsi; did you mean genrecal?"),
    ("loss: {teacher_distribution: top}\n", 1, "loss.teacher_distribution: expected one of exact, topk, got 'top'"),
    ("sample_ids: [a]\n", 1, "sample_ids cannot be set from a config file"),
    ("stages:\n  2: {stage: 3}\n", 2, "stages.2.stage: a stage block cannot set the stage"),
    ("stages:\n  2: {lr_ned: 1e-5}\n", 2,
     "stages.2.lr_ned: unknown key 'lr_ned' for TrainConfig; did you mean lr_end?"),
])
def test_a_bad_key_or_value_names_its_place_line_and_the_nearest_name(tmp_path, text, line, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigFileError) as err:
        read_config_file(path, TrainConfig, skip=LIBRARY_ONLY, choices=CHOICES)
    assert f"{path}, line {line}: " in str(err.value) and message in str(err.value)
    result = CliRunner().invoke(main, ["train", "--config", path, "--stage", "1"])  # the CLI says the same
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_a_saved_config_reads_back_as_the_same_settings(tmp_path):
    cfg = TrainConfig(cache="c", student="s", out="o", stage=2, method="vlsi", lr=3e-5, student_layers="2,4",
                      loss=LossConfig(kl_weight=0.5, regularizer=False), sample_ids=("a", "b"))
    path = write(tmp_path / "config.yaml", config_yaml(cfg, "a header\nover two lines", skip=LIBRARY_ONLY))
    assert open(path).read().startswith("# a header\n# over two lines\n")
    loaded = read_config_file(path, TrainConfig, skip=LIBRARY_ONLY, choices=CHOICES)
    assert from_nested(TrainConfig, loaded.values) == TrainConfig(**{**cfg.__dict__, "sample_ids": None})


def test_dump_teacher_reads_nested_generation_settings_and_layers(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.dump.dump_teacher", lambda cfg, **kw: seen.append(cfg) or (_ for _ in ()).throw(
        SystemExit(0)))
    recipe = write(tmp_path / "dump.yaml", f"""
model: qwen2-vl-72b
data: easy-vqa:train
out: {tmp_path / 'cache'}
layers: [40, 20]
feature_encoding: fp8_e4m3
trust_remote_code: true
generation:
  max_new_tokens: 512
""")
    result = CliRunner().invoke(pipeline_main, ["dump-teacher", "--config", recipe, "--no-trust-remote-code",
                                                "--temperature", "0.7", "--no-progress"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.model, cfg.layers, cfg.feature_encoding, cfg.trust_remote_code) == ("qwen2-vl-72b", (20, 40),
                                                                                    "fp8_e4m3", False)
    assert (cfg.generation.max_new_tokens, cfg.generation.temperature) == (512, 0.7)
    bad = write(tmp_path / "bad.yaml", "model: m\ngeneration:\n  max_new_token: 5\n")
    with pytest.raises(ConfigFileError, match=r"line 3: generation.max_new_token: .* did you mean max_new_tokens"):
        read_config_file(bad, DumpConfig)


def test_check_uses_the_files_settings_on_the_pair_given_on_the_command_line(tmp_path, pair_cache, pair_student):
    recipe = write(tmp_path / "r.yaml", "student: the-72b-sized-one\ncache: /nowhere\nrec_depth: 1\nstages:\n"
                                        "  1: {loss: {kl_weight: 0.5}}\n")
    args = ["check", "--config", recipe, "--student", str(pair_student.path), "--cache", str(pair_cache),
            "--batch-size", "2", "--stage", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "copies of the student's last 1 attention layers" in result.output and "the pair can train" in result.output


def _metrics(folder):
    rows = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_a_stage_reruns_from_its_saved_config_with_the_same_metrics(tmp_path, pair_cache, pair_student):
    run = tmp_path / "run"
    recipe = write(tmp_path / "r.yaml", f"""
cache: {pair_cache}
student: {pair_student.path}
out: {run}
lr: 1e-3
lr_end: 1e-4
num_workers: 0
attention_every: 2
loss: {{kl_weight: 0.5}}
stages:
  1: {{steps: 2, batch_size: 4}}
  2: {{steps: 3, batch_size: 2, grad_accum: 2, seed: 3}}
""")
    for stage in ("1", "2"):
        result = CliRunner().invoke(main, ["train", "--config", recipe, "--stage", stage, "--no-progress"])
        assert result.exit_code == 0, result.output
    first = _metrics(run / "stage2")
    saved = run / "stage2" / "config.yaml"
    assert f"student train --config {saved}" in saved.read_text()
    rerun = CliRunner().invoke(main, ["train", "--config", str(saved), "--no-progress"])
    assert rerun.exit_code == 0, rerun.output
    again = _metrics(run / "stage2")
    assert [row["step"] for row in again] == [1, 2, 3] and "question_reliance" in again[0]
    assert len(again) == len(first)
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_help_says_where_the_recipes_live():
    for cli, args in ((main, ["--help"]), (main, ["train", "--help"]), (main, ["check", "--help"]),
                      (pipeline_main, ["dump-teacher", "--help"])):
        flat = " ".join(CliRunner().invoke(cli, args).output.split())
        assert "recipes/" in flat, args
    train = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "--config FILE" in train and "OUT/stageN/config.yaml" in train and "--fsdp / --no-fsdp" in train
