"""`student`: the trainer side. Each command parses its options and calls one function.

    student train --cache cache/ --student llava-folder --out runs/a --stage 1 --steps 500
    student train --cache cache/ --student llava-folder --out runs/a --stage 2 --steps 500
    student train --cache cache/ --student llava-folder --out runs/a --stage 3 --steps 500
    student train ... --resume        # continue a stopped stage from its last checkpoint
    student train --config recipes/genrecal-qwen2-vl-72b-to-2b.yaml --stage 1 [--steps 10 ...]  # a recipe + overrides
    student eval --model runs/a/stage3 --data easy-vqa:test [--limit 200]   # -> runs/a/stage3/eval/*.json
    student check --student llava-folder --cache cache/ [--method vlsi] [--stage 2]   # will this pair train? (CPU, seconds)
"""

from __future__ import annotations

import sys

import click

from pipeline import __version__
from pipeline.config_cli import GIVEN, config_file_option, loaded_config, with_stage_block
from pipeline.storage_cli import CacheLocation, local_cache_options, storage_options
from student.cli_options import (CHOICES, CONFIG_HELP, LIBRARY_ONLY, config_options, stage_configs,
                                 train_config_from_options)
from student.config import TrainConfig
from student.methods import DEFAULT_METHOD, METHODS, method_named, stages_help


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Train small VLMs against a teacher cache (GenRecal).

    Ready-made config files for the paper's pairs, VLsI and KD are in recipes/ of the repository:
    student train --config recipes/genrecal-qwen2-vl-72b-to-2b.yaml --stage 1"""


@main.command("train")
@config_file_option(TrainConfig, CONFIG_HELP, skip=LIBRARY_ONLY, choices=CHOICES)
@config_options
@storage_options
@local_cache_options
@click.option("--resume", is_flag=True, help="Continue this stage from its last checkpoint.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def train_command(ctx, resume, progress, **options):
    """Train one GenRecal stage against a teacher cache (or, stage 3, plain SFT on a data source).

    Every option but --config, --resume and --progress is a field of student.config.TrainConfig (or its
    LossConfig). Recipes to start from: recipes/ (student train --config recipes/<recipe>.yaml --stage 1)."""
    from student.train import train_stage

    try:
        cfg = train_config_from_options(with_stage_block(ctx, options))
        metrics = train_stage(cfg, resume=resume, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if metrics:
        last = metrics[-1]
        click.echo(f"stage {cfg.stage}: {last['step']} steps, last loss {last['total']:.4f}; wrote {cfg.out}/stage{cfg.stage}")


@main.command("eval")
@click.option("--model", required=True, help="Model folder (teacher, student or any stage), alias or hub id.")
@click.option("--data", required=True, help="Data source: easy-vqa:test, a .json/.jsonl/.parquet file or datasets folder.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Only the first N samples.")
@click.option("--skip", type=click.IntRange(min=0), default=0, help="Start after the first N records (held-out slices).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--image-root", default=None, help="Folder the data's image paths are relative to.")
@click.option("--out", default=None,
              help="Result JSON. Default: MODEL/eval/<data>[-limitN][-fromK].json for a model folder (e.g. "
                   "easy-vqa:test --limit 200 -> MODEL/eval/easy-vqa-test-limit200.json); "
                   "eval/<model>/<data>[-limitN][-fromK].json under the current folder for an alias or hub id.")
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True)
def eval_command(**options):
    """Greedy answers of MODEL on DATA, scored per question type and overall: exact-match accuracy, and the score
    (scenes: object F1 for descriptions; `score` is the mean over question types)."""
    from pipeline.vlm.evaluate import evaluate
    from student.checkpoint import check_not_a_run_folder

    try:
        check_not_a_run_folder(options["model"])
        result = evaluate(**options)
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    for kind, counts in result["per_type"].items():
        click.echo(f"{kind}: score {_percent(counts['score'])}, exact {_percent(counts['accuracy'])} of {counts['samples']}")
    click.echo(f"all: score {_percent(result['score'])} (mean over types), exact {_percent(result['accuracy'])} of "
               f"{result['samples']} (skipped {result['skipped']}); wrote {result['output']}")


@main.command("check")
@config_file_option(TrainConfig, "A `student train` config file or recipe (recipes/): its student, cache and method, "
                    "and its settings per stage (loss, Recalibrator layout and depth, verbalizer layers); --student, "
                    "--cache and --method given here override it (e.g. a tiny stand-in pair).",
                    skip=LIBRARY_ONLY, choices=CHOICES, only=frozenset({"student", "cache", "method"}))
@click.option("--student", required=True, help="Student model folder, alias or hub id.")
@click.option("--cache", required=True, type=CacheLocation(), help="Teacher cache: a folder or an s3://, gs://, az:// URL.")
@storage_options
@local_cache_options
@click.option("--method", type=click.Choice(tuple(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="The `student train --method` to check the pair for (student/methods.py declares each).")
@click.option("--stage", type=click.IntRange(1, 3), multiple=True,
              help=f"Check only this stage (repeatable). Default: every stage of the method and the stage 3 that may "
                   f"follow it ({stages_help()}).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Samples in the test batch.")
@click.option("--memory-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batch size the memory estimate is for.")
@click.pass_context
def check_command(ctx, student, cache, method, stage, batch_size, memory_batch):
    """One batch, one forward+backward of each stage on CPU: exit 0 when the pair can train, 2 with the reasons."""
    from student.check import check_pair

    configs = None
    loaded = loaded_config(ctx)
    if loaded is not None:  # the file's settings of each checked stage, on the pair given here
        given = {"method": method} if ctx.get_parameter_source("method") in GIVEN else {}
        try:
            configs = stage_configs(loaded, stage or method_named(method).checked_stages(), student=student,
                                    cache=cache, **given)
        except ValueError as err:
            raise click.UsageError(f"{loaded.path}: {err}") from None
    report = check_pair(student, cache, stages=stage or None, batch_size=batch_size, memory_batch=memory_batch,
                        method=method, configs=configs)
    click.echo(report.text())
    sys.exit(0 if report.ok else 2)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
