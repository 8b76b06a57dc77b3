"""`pipeline`: the teacher side. Each command parses its options and calls one function.

    pipeline inspect cache/          # what the cache holds, bytes per token per array
    pipeline verify cache/           # checksums and schema; exit 1 naming bad shards
"""

from __future__ import annotations

import json
import sys

import click

from schemas import CacheFormatError
from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Run a large teacher VLM once and manage the teacher cache it fills."""


@main.command("inspect")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(cache: str, as_json: bool) -> None:
    """Summarise CACHE: samples, tokens, bytes per token per array, teacher and settings."""
    from pipeline.inspect_cache import cache_summary, format_summary

    summary = _or_fail(cache_summary, cache)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@main.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, help="Show a progress bar over shards.")
def verify_command(cache: str, progress: bool) -> None:
    """Check CACHE's schema, checksums and arrays; exit 1 listing every bad shard."""
    from pipeline.verify import verify_cache

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
    except CacheFormatError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
