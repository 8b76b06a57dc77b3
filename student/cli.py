"""`student`: the trainer side. Commands land here as they are built (train, eval, export)."""

from __future__ import annotations

import click

from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genrecal")
def main() -> None:
    """Train small VLMs against a teacher cache (GenRecal)."""


if __name__ == "__main__":
    main()
