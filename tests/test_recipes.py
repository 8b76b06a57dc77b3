"""recipes/: every file parses and each key is a field; the stages are in order with the paper's batch and steps;
the storage lines are the cache format's; each dump recipe runs on a tiny teacher and `student check` runs each
training recipe on a tiny stand-in pair, with the recipe's settings but the sizes; the launch scripts are sound."""

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cache_size import bytes_per_row, cache_bytes
from pipeline.cli import main as pipeline_main
from pipeline.config_file import from_nested, read_config_file
from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from student.cli import main as student_main
from student.cli_options import CHOICES, LIBRARY_ONLY
from student.config import TrainConfig
from student.methods import method_named, stage_of
from tests.vlsi_fixtures import TEACHER_LAYERS, same_student, same_teacher_dir  # noqa: F401 - fixtures

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DUMPS = sorted(p.name for p in RECIPES.glob("dump-*.yaml"))
TRAINING = sorted(p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("dump-"))
LAUNCHERS = ("torchrun.sh", "slurm.sbatch")
PAPER_GLOBAL_BATCH = {1: 8192, 2: 4096, 3: 8192}


def read(name: str):
    cls = DumpConfig if name.startswith("dump-") else TrainConfig
    return read_config_file(str(RECIPES / name), cls, skip=LIBRARY_ONLY, choices=CHOICES)


def stage_configs(loaded) -> dict[int, TrainConfig]:
    return {stage: from_nested(TrainConfig, {**loaded.settings(stage), "stage": stage}) for stage in loaded.stages}


def test_the_recipes_are_there():
    assert len(DUMPS) >= 3 and len(TRAINING) >= 5
    assert any(name.startswith("vlsi-") for name in TRAINING) and any(name.startswith("kd-") for name in TRAINING)
    for pair in ("qwen2-vl-72b-to-2b", "qwen2-vl-72b-to-7b", "internvl2.5-78b-to-8b"):
        assert f"genrecal-{pair}.yaml" in TRAINING


@pytest.mark.parametrize("name", DUMPS + TRAINING)
def test_a_recipe_parses_every_key_is_a_field_and_its_header_says_where_the_numbers_come_from(name):
    loaded = read(name)  # unknown keys and wrong types raise here
    text = (RECIPES / name).read_text()
    assert text.startswith("# ") and "Where the numbers come from" in text, name
    if name.startswith("dump-"):
        from_nested(DumpConfig, loaded.values)
        return
    configs = stage_configs(loaded)  # each stage is a valid TrainConfig (the method's own rules included)
    assert configs and all((c.lr, c.lr_end) == (1e-4, 1e-5) for c in configs.values())  # the paper's schedule


@pytest.mark.parametrize("name", TRAINING)
def test_the_stages_are_in_order_with_the_papers_global_batch_and_steps(name):
    loaded = read(name)
    configs, notes = stage_configs(loaded), loaded.recipe
    stages = list(configs)
    first = configs[stages[0]]
    assert stages == list(range(stages[0], 4)), "stages in order, no gaps, ending with the SFT stage 3"
    assert stages[0] == method_named(first.method).first_stage
    assert stages[0] == 1 or first.method != "genrecal"
    for stage, cfg in configs.items():
        stage_of(cfg)  # the stage's method has it
        assert not cfg.from_student and cfg.data is None, "a later stage starts from OUT/stage{N-1}"
        assert (cfg.out, cfg.cache, cfg.student) == (first.out, first.cache, first.student)
        global_batch = notes["global_batch"][stage]
        assert cfg.batch_size * cfg.grad_accum * notes["world_size"] == global_batch, stage
        assert cfg.steps == math.ceil(notes["samples"][stage] / global_batch), stage
    assert notes["world_size"] == 128  # the paper's 128 GPUs
    assert notes["global_batch"] == {s: PAPER_GLOBAL_BATCH[s] for s in stages}


@pytest.mark.parametrize("name", TRAINING)
def test_the_dump_a_recipe_reads_exists_and_holds_what_its_method_needs(name):
    loaded = read(name)
    dump_file = RECIPES.parent / loaded.recipe["dump"]
    assert dump_file.exists(), dump_file
    dump = from_nested(DumpConfig, read(dump_file.name).values)
    for cfg in stage_configs(loaded).values():
        assert cfg.cache == dump.out
        stage = stage_of(cfg)
        assert dump.layers or not stage.layers, f"stage {cfg.stage} needs the teacher's layers: dump with layers"
        assert dump.top_k > 0 or not stage.topk


@pytest.mark.parametrize("name", DUMPS)
def test_the_storage_lines_are_the_cache_formats(name):
    loaded = read(name)
    dump, notes = from_nested(DumpConfig, loaded.values), loaded.recipe
    assumed, hidden = notes["assumed"], notes["hidden_size"]
    text = (RECIPES / name).read_text()
    for encoding, terabytes in notes["storage_tb_per_million_samples"].items():
        computed = cache_bytes(1_000_000, encoding, hidden, dump.top_k, assumed["answer_positions"],
                               assumed["question_positions"], dump.question_features_fraction, dump.logprob_dtype,
                               layers=len(dump.layers)) / 1e12
        assert terabytes == round(computed, 2), encoding
        row = bytes_per_row(encoding, hidden, dump.top_k, dump.logprob_dtype, len(dump.layers))["tokens"]
        assert f"{row:,}" in text and f"{terabytes:.2f} TB" in text, encoding  # the header says the same


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory, same_teacher_dir):  # noqa: F811 - a fixture
    """Dump recipe -> a cache of the tiny same-tokenizer teacher, dumped with the recipe's settings but the sizes:
    the model, 4 samples, the tiny teacher's layers, 4 new tokens, one CPU process with the HF backend."""
    caches = {}
    for name in DUMPS:
        cfg = from_nested(DumpConfig, read(name).values)
        out = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
        tiny = dataclasses.replace(
            cfg, model=str(same_teacher_dir), data="easy-vqa:train", out=str(out), limit=4, backend="hf",
            layers=TEACHER_LAYERS if cfg.layers else (), tensor_parallel_size=1, device_map=None, device="cpu",
            dtype="float32", generation=dataclasses.replace(cfg.generation, max_new_tokens=4))
        stats = dump_teacher(tiny, progress=False)
        assert stats.written == 4, name
        caches[name] = out
    return caches


@pytest.mark.parametrize("name", TRAINING)
def test_student_check_runs_the_recipe_on_a_tiny_stand_in_pair(name, tiny_caches, pair_student,
                                                               same_student):  # noqa: F811 - a fixture
    loaded = read(name)
    shared = any(stage_of(cfg).shared_tokenizer for cfg in stage_configs(loaded).values())
    student = same_student if shared else pair_student  # the tiny teacher's tokenizer, or another family's
    cache = tiny_caches[Path(loaded.recipe["dump"]).name]
    args = ["check", "--config", str(RECIPES / name), "--student", str(student.path), "--cache", str(cache),
            "--batch-size", "2"]
    result = CliRunner().invoke(student_main, args)
    assert result.exit_code == 0, result.output
    assert "the pair can train" in result.output and result.output.count("estimated memory") == len(loaded.stages)


def test_the_dump_recipes_reach_the_dump_command(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.dump.dump_teacher", lambda cfg, **kw: seen.append(cfg) or sys.exit(0))
    for name in DUMPS:
        result = CliRunner().invoke(pipeline_main, ["dump-teacher", "--config", str(RECIPES / name), "--out",
                                                    str(tmp_path / name), "--no-progress"])
        assert result.exit_code == 0, result.output
    assert [cfg.model for cfg in seen] == [from_nested(DumpConfig, read(n).values).model for n in DUMPS]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_the_launch_scripts_parse_name_recipes_that_exist_and_pass_only_real_options(script):
    path = RECIPES / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text().replace("\\\n", " ")
    for recipe in re.findall(r"recipes/[\w.\-/]+\.yaml", text):
        assert (RECIPES.parent / recipe).exists(), recipe
    commands = {"pipeline.cli dump-teacher": pipeline_main.commands["dump-teacher"],
                "student.cli train": student_main.commands["train"]}
    for invocation, command in commands.items():
        lines = [line for line in text.splitlines() if invocation in line]
        assert lines, invocation
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for line in lines:
            used = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split(invocation, 1)[1])
            assert set(used) <= known, (invocation, set(used) - known)
    for name in re.findall(r"recipes/((?!dump-)[\w.\-]+\.yaml)", text):  # training across nodes: with FSDP2
        assert all(cfg.fsdp for cfg in stage_configs(read(name)).values()), name
