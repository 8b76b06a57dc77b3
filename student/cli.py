"""`student`: the trainer side. Each command parses its options and calls one function.

    student train --cache cache/ --student llava-folder --out runs/a --stage 1 --steps 500
    student train --cache cache/ --student llava-folder --out runs/a --stage 2 --steps 500
    student train --cache cache/ --student llava-folder --out runs/a --stage 3 --steps 500
    student train ... --resume        # continue a stopped stage from its last checkpoint
    student eval --model runs/a/stage3 --data easy-vqa:test [--limit 200]   # -> runs/a/stage3/eval/*.json
"""

from __future__ import annotations

import sys

import click

from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Train small VLMs against a teacher cache (GenRecal)."""


@main.command("train")
@click.option("--cache", type=click.Path(exists=True, file_okay=False), help="Teacher cache folder.")
@click.option("--data", default=None, help="Stage 3 only: SFT on this data source instead of a cache (e.g. easy-vqa:train).")
@click.option("--data-limit", type=int, default=None, help="With --data: its first N samples.")
@click.option("--from-student", is_flag=True, help="Start from --student, not OUT/stage{N-1} (e.g. an SFT baseline).")
@click.option("--student", required=True, help="Student (stage 1): alias, hub id or folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; stage N writes OUT/stageN.")
@click.option("--stage", required=True, type=click.IntRange(1, 3))
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-end", type=float, default=1e-5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--teacher-distribution", type=click.Choice(["exact", "topk"]), default="exact", show_default=True)
@click.option("--no-regularizer", is_flag=True, help="Skip Alg. 2 (for ablations).")
@click.option("--ce-weight", type=float, default=1.0, show_default=True,
              help="Weight of CE(teacher head(recalibrated), teacher ids), main path and regularizer (0: KL only).")
@click.option("--kl-weight", type=float, default=1.0, show_default=True, help="Weight of the forward-KL terms.")
@click.option("--student-ce-weight", type=float, default=1.0, show_default=True, help="Stage 2: the student's own CE.")
@click.option("--rec-depth", type=int, default=2, show_default=True)
@click.option("--rec-init", type=click.Choice(["copy", "random"]), default="copy", show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--save-every", type=int, default=0, help="Checkpoint every N steps (0: at the end).")
@click.option("--image-root", default=None, help="Override the cache's image root.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPU, fp32 on CPU.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute layer activations in the backward pass.")
@click.option("--fsdp", is_flag=True, help="Shard the student with FSDP2 (under torchrun).")
@click.option("--attention-every", type=int, default=10, show_default=True,
              help="Log the Recalibrator's attention share on the student question every N steps (0: never).")
@click.option("--train-vision-encoder", is_flag=True,
              help="Stages 2-3: train the vision encoder too (models trained from scratch; the method freezes it).")
@click.option("--tensorboard", is_flag=True, help="Also log to OUT/tensorboard/stageN.")
@click.option("--resume", is_flag=True, help="Continue this stage from its last checkpoint.")
@click.option("--progress/--no-progress", default=True)
def train_command(teacher_distribution, no_regularizer, ce_weight, kl_weight, student_ce_weight, resume, progress,
                  **options):
    """Train one GenRecal stage against a teacher cache (or, stage 3, plain SFT on a data source)."""
    from student.loop import train_stage
    from student.config import LossConfig
    from student.config import TrainConfig

    loss = LossConfig(teacher_distribution=teacher_distribution, regularizer=not no_regularizer, ce_weight=ce_weight,
                      kl_weight=kl_weight, student_ce_weight=student_ce_weight)
    try:
        cfg = TrainConfig(loss=loss, **options)
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
@click.option("--out", default=None, help="Result JSON (default: MODEL/eval/<data>.json).")
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True)
def eval_command(**options):
    """Greedy exact-match accuracy of MODEL on DATA, overall and per question type."""
    from pipeline.vlm.evaluate import evaluate

    try:
        result = evaluate(**options)
    except (FileNotFoundError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    for kind, counts in result["per_type"].items():
        click.echo(f"{kind}: {_percent(counts['accuracy'])} of {counts['samples']}")
    click.echo(f"all: {_percent(result['accuracy'])} of {result['samples']} (skipped {result['skipped']}); "
               f"wrote {result['output']}")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
