"""`pipeline dump-teacher` options come from DumpConfig's fields; its summary line counts both phases."""

import dataclasses
import json
import re

from click.testing import CliRunner

import pipeline.cli as cli_module
from pipeline.cli import dump_summary, dump_teacher_command, main as pipeline_cli
from pipeline.dump_config import DumpConfig
from pipeline.vlm.generation import GenerationSettings
from schemas.dataclass_io import field_docs

ENV_DEFAULTS = {"num_workers", "worker_index"}  # default None on the CLI: torchrun's WORLD_SIZE / RANK decide


def test_every_option_has_the_help_and_default_of_its_field():
    params = {p.name: p for p in dump_teacher_command.params}
    for cls in (DumpConfig, GenerationSettings):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name == "generation":
                continue
            option = params[f.name]
            assert option.help and option.help == docs[f.name], f.name
            if f.name in ENV_DEFAULTS:
                assert option.default is None
            elif f.default is not dataclasses.MISSING:
                assert option.default == f.default, f.name
            else:
                assert option.required, f.name
    assert all(p.help for p in dump_teacher_command.params), [p.name for p in dump_teacher_command.params if not p.help]
    help_text = CliRunner().invoke(pipeline_cli, ["dump-teacher", "--help"]).output
    for flag in ("--responses", "--on-incorrect", "--max-length", "--shard-tokens", "--generate-batch-size"):
        assert flag in help_text
    assert "Stored positions per committed shard" in help_text  # --shard-tokens keeps its short name


def test_bad_generate_batch_size_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(pipeline_cli, ["dump-teacher", "--model", "m", "--data", "easy-vqa:train",
                                               "--out", str(tmp_path / "c"), "--generate-batch-size", "0"])
    assert result.exit_code == 2 and "--generate-batch-size must be >= 1" in result.output
    assert not (tmp_path / "c").exists()


def dump_command(model_dir, out, *extra):
    return ["dump-teacher", "--model", str(model_dir), "--data", "easy-vqa:train", "--out", str(out), "--top-k", "4",
            "--responses", "generate", "--backend", "hf", "--max-new-tokens", "3", "--no-progress", *extra]


def summary_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("worker 0/1: "))


def test_summary_line_counts_generation_and_features(tmp_path, tiny_vlm_dir, monkeypatch):
    seen = []  # the stats the CLI summarised, unrounded: a tiny model's generation can take under 5 ms
    monkeypatch.setattr(cli_module, "dump_summary", lambda stats, cache: seen.append(stats) or dump_summary(stats, cache))
    result = CliRunner().invoke(pipeline_cli, dump_command(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), tmp_path / "c",
                                                           "--limit", "3"))
    assert result.exit_code == 0, result.output
    summary = summary_line(result.output)
    assert "3 written, 0 rejected, 0 already done" in summary
    seconds = re.search(r"generation ([\d.]+) s, features ([\d.]+) s, total ([\d.]+) s", summary)
    assert seconds, summary
    (stats,) = seen
    assert stats.generate_seconds > 0 and stats.feature_seconds > 0
    assert stats.total_seconds >= stats.generate_seconds + stats.feature_seconds
    printed = tuple(map(float, seconds.groups()))
    assert printed == tuple(round(x, 2) for x in (stats.generate_seconds, stats.feature_seconds, stats.total_seconds))


def test_every_sample_rejected_fails_with_the_reasons_and_what_to_do(tmp_path, tiny_vlm_dir):
    out = tmp_path / "c"
    command = dump_command(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), out, "--limit", "6", "--max-length", "1")
    result = CliRunner().invoke(pipeline_cli, command)
    assert result.exit_code == 1, result.output
    assert f"0 written, 6 rejected (length 6; list them: pipeline inspect {out} --rejects)" in summary_line(result.output)
    assert "error: 6 of 6 samples of worker 0 were rejected:" in result.output
    assert "length 6: easy-vqa:train:0, easy-vqa:train:1, easy-vqa:train:2, ...; e.g. prompt of" in result.output
    assert "raise --max-length" in result.output and "dump to a new --out" in result.output
    # a rerun skips them all, and still fails: the cache holds nothing for this worker
    again = CliRunner().invoke(pipeline_cli, command)
    assert again.exit_code == 1 and "0 written, 0 rejected, 6 already done" in again.output
    assert "6 of 6 samples of worker 0 were rejected" in again.output


def test_partial_rejection_fails_above_max_reject_fraction(tmp_path, tiny_vlm_dir, tiny_image):
    root = tmp_path / "images"
    root.mkdir()
    tiny_image.save(root / "a.png")
    records = [{"id": f"r{i}", "image": "a.png" if i == 0 else f"missing{i}.png",
                "conversations": [{"from": "human", "value": "<image>What shape?"}, {"from": "gpt", "value": "circle"}]}
               for i in range(4)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    command = ["dump-teacher", "--model", str(tiny_vlm_dir("internvl-tiny", "tiny-bpe")), "--data", str(data),
               "--image-root", str(root), "--out", str(tmp_path / "c"), "--top-k", "4", "--no-progress"]
    result = CliRunner().invoke(pipeline_cli, command)  # 3 of 4 rejected > the default 0.5
    assert result.exit_code == 1, result.output
    assert "1 written, 3 rejected" in result.output
    assert "error: 3 of 4 samples of worker 0 were rejected (more than --max-reject-fraction 0.5):" in result.output
    assert "image 3: r1, r2, r3; e.g." in result.output and "check --image-root" in result.output
    accepted = CliRunner().invoke(pipeline_cli, command + ["--max-reject-fraction", "0.8"])
    assert accepted.exit_code == 0 and "error" not in accepted.output, accepted.output
    bad = CliRunner().invoke(pipeline_cli, command + ["--max-reject-fraction", "1.5"])
    assert bad.exit_code == 2 and "--max-reject-fraction must be in [0, 1]" in bad.output


def test_rejection_rule_below_the_threshold_passes():
    from pipeline.dump import DumpStats, rejection_problem

    cfg = DumpConfig(model="m", data="d", out="o")
    stats = DumpStats(slice_samples=4, slice_rejects=[("a", "image", "not found"), ("b", "image", "not found")])
    assert rejection_problem(cfg, stats) is None  # exactly half: not more than 0.5
    assert rejection_problem(cfg, DumpStats(slice_samples=3, slice_rejects=[])) is None
    one_of_one = rejection_problem(DumpConfig(model="m", data="d", out="o", max_reject_fraction=1.0),
                                   DumpStats(slice_samples=1, slice_rejects=[("a", "template", "x")]))
    assert one_of_one.startswith("1 of 1 samples of worker 0 were rejected:")  # all rejected fails even at 1.0
