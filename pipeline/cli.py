"""`pipeline`: the teacher side. Each command parses its options and calls one function.

    pipeline inspect cache/          # what the cache holds, bytes per token per array
    pipeline verify cache/           # checksums and schema; exit 1 naming bad shards
    pipeline dump-teacher --model qwen2-vl-72b --data llava.json --image-root /data --out cache/
    torchrun --nproc_per_node 8 -m pipeline.cli dump-teacher ...   # one worker per GPU
"""

from __future__ import annotations

import json
import sys

import click

from schemas import CacheFormatError, CacheMismatchError
from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Run a large teacher VLM once and manage the teacher cache it fills."""


@main.command("dump-teacher")
@click.option("--model", required=True, help="Teacher: alias (qwen2-vl-72b, ...), hub id, or local folder.")
@click.option("--data", required=True, help="LLaVA JSON, TRL jsonl/parquet/datasets folder, or easy-vqa:train|test.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder (an existing one is resumed).")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False), help="Root of relative image paths.")
@click.option("--split", help="Split of a datasets folder holding a DatasetDict.")
@click.option("--responses", type=click.Choice(["dataset", "generate"]), default="dataset", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
              help="Generation backend (auto: vLLM when installed and on GPU).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep-if-correct", is_flag=True, help="Keep a generated answer only if it agrees with the reference.")
@click.option("--on-incorrect", type=click.Choice(["reference", "reject"]), default="reference", show_default=True)
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM tensor parallel size.")
@click.option("--top-k", type=int, default=64, show_default=True, help="Top-k log-probs stored per position.")
@click.option("--logprob-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--feature-encoding", type=click.Choice(["bf16", "fp8_e4m3", "int8"]), default="bf16", show_default=True)
@click.option("--question-features-fraction", type=float, default=0.0, show_default=True)
@click.option("--max-length", type=int, default=4096, show_default=True)
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32.")
@click.option("--device", default="auto", show_default=True)
@click.option("--device-map", default=None, help="'auto' spreads the teacher over all GPUs.")
@click.option("--attn-implementation", default=None, help="sdpa, flash_attention_2, eager.")
@click.option("--trust-remote-code", is_flag=True, help="Run code from the model repository.")
@click.option("--revision", default=None)
@click.option("--num-workers", type=int, default=None, help="Workers splitting the data (default: WORLD_SIZE or 1).")
@click.option("--worker-index", type=int, default=None, help="This worker (default: RANK or 0).")
@click.option("--shard-tokens", "shard_target_tokens", type=int, default=8192, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N samples.")
@click.option("--progress/--no-progress", default=True)
def dump_teacher_command(progress: bool, max_new_tokens, temperature, top_p, seed, num_workers, worker_index, **options):
    """Run the teacher once over --data and write the cache to --out (rerun to resume)."""
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig, workers_from_env
    from pipeline.vlm.generation import GenerationSettings

    n, i = workers_from_env(num_workers, worker_index)
    generation = GenerationSettings(max_new_tokens, temperature, top_p, seed)
    try:
        cfg = DumpConfig(generation=generation, num_workers=n, worker_index=i, **options)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    stats = _or_fail(dump_teacher, cfg, progress=progress)
    click.echo(
        f"worker {i}/{n}: {stats.written} written, {stats.rejected} rejected, {stats.skipped} already done; "
        f"{stats.tokens} tokens in {stats.wall_seconds:.1f} s; reject reasons {stats.reject_reasons or '{}'}"
    )


@main.command("build-tiny")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the new model.")
@click.option("--seed", type=int, default=0, show_default=True)
def build_tiny_command(name: str, out: str, seed: int) -> None:
    """Build a named tiny VLM with random weights (demo-teacher, demo-student, qwen2-vl-tiny, llava-tiny, ...)."""
    from pipeline.demo.run import build_named

    folder = _or_fail(build_named, name, out, seed)
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
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(cache: str, as_json: bool) -> None:
    """Summarise CACHE: samples, tokens, bytes per token per array, teacher and settings."""
    from pipeline.store.inspect_cache import cache_summary, format_summary

    summary = _or_fail(cache_summary, cache)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@main.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
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
    from pipeline.vlm.models import ModelLoadError

    return CacheFormatError, CacheMismatchError, DataError, EncodingBoundError, ModelLoadError


if __name__ == "__main__":
    main()
