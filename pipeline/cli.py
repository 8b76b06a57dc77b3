"""`pipeline`: the teacher side. Each command parses its options and calls one function.

    pipeline inspect cache/          # what the cache holds, bytes per token per array
    pipeline inspect cache/ --rejects  # the rejected samples: id, stage, reason
    pipeline verify cache/           # checksums and schema; exit 1 naming bad shards
    pipeline pretrain-vision --model init/ --data easy-vqa:train --limit 20000 --out vpre/  # before a teacher's SFT
    pipeline dump-teacher --model qwen2-vl-72b --data llava.json --image-root /data --out cache/
    pipeline dump-teacher ... --layers 20,40,60   # also intermediate layers (or --layers every:8), for VLsI
    pipeline dump-teacher --config recipes/dump-qwen2-vl-72b.yaml --data llava.json   # a recipe + overrides
    torchrun --nproc_per_node 8 -m pipeline.cli dump-teacher ...   # one worker per GPU
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from schemas import CacheFormatError, CacheMismatchError
from pipeline import __version__
from pipeline.config_cli import config_file_option
from pipeline.config_options import config_options
from pipeline.dump_config import DumpConfig, workers_from_env
from pipeline.storage_cli import CacheLocation, storage_options
from pipeline.vlm.generation import GenerationSettings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Run a large teacher VLM once and manage the teacher cache it fills."""


class LayersParam(click.ParamType):
    """--layers: "8,16,24" -> (8, 16, 24), "every:K" -> EveryLayers(K) (resolved once the teacher's layer count is known)."""

    name = "LIST|every:K"

    def convert(self, value, param, ctx):
        from pipeline.dump_config import LayerChoiceError, parse_layers

        try:
            return parse_layers(value)
        except LayerChoiceError as err:
            self.fail(str(err), param, ctx)


# Every DumpConfig field is an option (help text and default from the field), but `generation`, whose
# fields are options of their own; the CLI defaults of the worker split come from torchrun's environment.
DUMP_OPTIONS = dict(
    skip={"generation"},
    overrides={
        "layers": {"type": LayersParam(), "show_default": False, "metavar": "LIST|every:K"},
        "out": {"type": click.Path(file_okay=False)},
        "image_root": {"type": click.Path(exists=True, file_okay=False)},
        "shard_target_tokens": {"decls": ["--shard-tokens"]},
        "num_workers": {"default": None, "show_default": False},
        "worker_index": {"default": None, "show_default": False},
    },
)


@main.command("dump-teacher")
@config_file_option(DumpConfig, "A YAML file of these options, keys as DumpConfig's fields nest (generation: "
                    "{max_new_tokens: 512}); a flag given here overrides the file. Ready-made dumps for the paper's "
                    "teachers are in recipes/ of the repository.")
@config_options(DumpConfig, **DUMP_OPTIONS)
@config_options(GenerationSettings)
@storage_options
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def dump_teacher_command(progress: bool, num_workers, worker_index, **options):
    """Run the teacher once over --data and write the cache to --out (rerun to resume).

    Exit status 1 when too many samples were rejected (see --max-reject-fraction) or the vLLM phase failed."""
    from pipeline.dump import dump_teacher, rejection_problem
    from pipeline.response_log import GenerationPhaseError
    from pipeline.vlm.generation import GenerationError

    from pipeline.dump_config import EveryLayers, LayerChoiceError, resolve_layers, teacher_layer_count

    n, i = workers_from_env(num_workers, worker_index)
    generation = GenerationSettings(**{f.name: options.pop(f.name) for f in dataclasses.fields(GenerationSettings)})
    try:
        if isinstance(options["layers"], EveryLayers):  # every:K needs the teacher's layer count (from its config)
            probe = DumpConfig(generation=generation, num_workers=n, worker_index=i, **{**options, "layers": ()})
            options["layers"] = resolve_layers(options["layers"], _or_fail(teacher_layer_count, probe))
        cfg = DumpConfig(generation=generation, num_workers=n, worker_index=i, **options)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        stats = _or_fail(dump_teacher, cfg, progress=progress)
    except LayerChoiceError as err:  # a layer the teacher does not have: found once its layer count is known
        raise click.UsageError(str(err)) from None
    except (GenerationPhaseError, GenerationError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    click.echo(f"worker {i}/{n}: {dump_summary(stats, cfg.out)}")
    problem = rejection_problem(cfg, stats)
    if problem:
        click.echo(f"error: {problem}", err=True)
        sys.exit(1)


def dump_summary(stats, cache: str) -> str:
    """One line: counts, reject reasons, and where the time went (generation and feature pass apart)."""
    reasons = ", ".join(f"{stage} {count}" for stage, count in sorted(stats.reject_reasons.items()))
    rejected = f"{stats.rejected} rejected" + (f" ({reasons}; list them: pipeline inspect {cache} --rejects)" if reasons else "")
    return (
        f"{stats.written} written, {rejected}, {stats.skipped} already done; {stats.tokens} tokens; "
        f"generation {stats.generate_seconds:.2f} s, features {stats.feature_seconds:.2f} s, "
        f"total {stats.total_seconds:.2f} s (model loading included)"
    )


@main.command("build-tiny")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the new model.")
@click.option("--seed", type=int, default=0, show_default=True)
def build_tiny_command(name: str, out: str, seed: int) -> None:
    """Build a named tiny VLM with random weights: demo-teacher, demo-student or any family of the test matrix
    (pipeline/vlm/tiny.py FAMILIES: qwen2-vl-tiny, qwen3-vl-tiny, gemma3-tiny, paligemma-tiny, llava-tiny, ...)."""
    from pipeline.demo.run import build_named

    folder = _or_fail(build_named, name, out, seed)
    click.echo(f"wrote {folder}")


@main.command("pretrain-vision")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="A stock HF VLM folder.")
@click.option("--data", required=True, help="Data source whose samples carry meta question types (easy-vqa:train).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the pretrained model.")
@click.option("--image-root", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--skip", type=int, default=0, show_default=True, help="Records to skip first.")
@click.option("--limit", type=int, default=None, help="Records to read after --skip (default: all).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def pretrain_vision_command(model, data, out, image_root, skip, limit, steps, lr, batch_size, seed) -> None:
    """Fit a VLM's vision encoder + projector to per-image answer labels before SFT (models built from config)."""
    from pipeline.vlm.vision_pretrain import pretrain_vision

    folder = _or_fail(pretrain_vision, model, out, data, limit=limit, skip=skip, steps=steps, lr=lr,
                      batch_size=batch_size, seed=seed, image_root=image_root, log=click.echo)
    click.echo(f"wrote {folder}")


@main.command("demo")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder (default runs/demo, or runs/demo-quick with --quick).")
@click.option("--quick", is_flag=True, help="Tiny settings: a few minutes (what CI runs).")
def demo_command(out: str | None, quick: bool) -> None:
    """Train a tiny teacher, dump it, distil a student of another family and tokenizer, compare with SFT."""
    from pipeline.demo.run import run_demo

    try:
        run_demo(out or ("runs/demo-quick" if quick else "runs/demo"), quick=quick, echo=click.echo)
    except (RuntimeError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


@main.command("inspect")
@click.argument("cache", type=CacheLocation())
@storage_options
@click.option("--rejects", is_flag=True, help="List the rejected samples with their ids and reasons instead.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_command(cache: str, rejects: bool, as_json: bool) -> None:
    """Summarise CACHE: samples, tokens, bytes per token per array, teacher and settings."""
    from pipeline.store.inspect_cache import cache_summary, format_rejects, format_summary, list_rejects

    if rejects:
        rows = _or_fail(list_rejects, cache)
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False) if as_json else format_rejects(rows))
        return
    summary = _or_fail(cache_summary, cache)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@main.command("verify")
@click.argument("cache", type=CacheLocation())
@storage_options
@click.option("--progress/--no-progress", default=True, help="Show a progress bar over shards.")
def verify_command(cache: str, progress: bool) -> None:
    """Check CACHE's schema, checksums and arrays; exit 1 listing every bad shard."""
    from pipeline.store.verify import verify_cache

    report = _or_fail(verify_cache, cache, progress=progress)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.ok:
        click.echo(f"ok: {report.shards_checked} shards, {report.samples} samples verified")
        return
    click.echo(f"FAILED: {len(report.problems)} bad item(s) in {cache}", err=True)
    for key, problems in report.problems.items():
        for problem in problems:
            click.echo(f"  {key}: {problem}", err=True)
    sys.exit(1)


def _or_fail(fn, *args, **kwargs):
    """Turn contract errors into one clear line and exit status 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input: reported in one line, never with a traceback."""
    from pipeline.vlm.data import DataError
    from pipeline.store.encoding import EncodingBoundError
    from pipeline.store.storage import StorageError
    from pipeline.vlm.models import ModelLoadError

    return CacheFormatError, CacheMismatchError, DataError, EncodingBoundError, ModelLoadError, StorageError


if __name__ == "__main__":
    main()
