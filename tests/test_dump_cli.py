"""`pipeline dump-teacher` options come from DumpConfig's fields; its summary line counts both phases."""

import dataclasses
import re

from click.testing import CliRunner

from pipeline.cli import dump_teacher_command, main as pipeline_cli
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


def test_summary_line_counts_generation_and_features_and_reject_reasons(tmp_path, tiny_vlm_dir):
    out = tmp_path / "c"
    result = CliRunner().invoke(pipeline_cli, [
        "dump-teacher", "--model", str(tiny_vlm_dir("internvl-tiny", "tiny-bpe")), "--data", "easy-vqa:train",
        "--out", str(out), "--limit", "6", "--top-k", "4", "--responses", "generate", "--backend", "hf",
        "--max-new-tokens", "3", "--max-length", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert f"0 written, 6 rejected (length 6; list them: pipeline inspect {out} --rejects)" in line
    seconds = re.search(r"generation ([\d.]+) s, features ([\d.]+) s, total ([\d.]+) s", line)
    assert seconds, line
    generation, features, total = map(float, seconds.groups())
    assert generation > 0 and total >= generation + features - 0.2  # each figure is rounded to 0.1 s
