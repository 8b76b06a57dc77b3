"""Click options made from a settings dataclass: its defaults, types and field docstrings.

    @config_options(DumpConfig, skip={"generation"}, overrides={"shard_target_tokens": {"decls": ["--shard-tokens"]}})
    def command(**options): DumpConfig(**options)

Each default and each help text is written once, on the dataclass field (see
`schemas.dataclass_io.field_docs`); the option of field `max_length` is `--max-length`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import click

from schemas.dataclass_io import field_docs


def config_options(cls: type, skip: set[str] = frozenset(), overrides: dict[str, dict] | None = None):
    """Decorator adding one option per field of dataclass `cls` (in field order), but those in `skip`.

    `overrides[name]` holds click.option keyword arguments for one field, plus "decls" (the option's
    names) when `--field-name` is not the name wanted.
    """
    overrides = overrides or {}
    hints, docs = get_type_hints(cls), field_docs(cls)
    options = [
        field_option(f, hints[f.name], docs.get(f.name), dict(overrides.get(f.name, {})))
        for f in dataclasses.fields(cls)
        if f.name not in skip
    ]

    def decorate(fn):
        for option in reversed(options):  # click lists the option applied last first
            fn = option(fn)
        return fn

    return decorate


def field_option(f: dataclasses.Field, hint, doc: str | None, extra: dict):
    flag = f.name.replace("_", "-")
    inner = _without_none(hint)
    # a bool goes both ways (--x/--no-x), so the command line can undo what a --config file set
    decls = extra.pop("decls", [f"--{flag}/--no-{flag}" if inner is bool else f"--{flag}"])
    kwargs: dict = {"help": doc}
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    elif inner is bool:
        kwargs.update(default=f.default, show_default=True)
    else:
        kwargs.update(default=f.default, show_default=f.default is not None)
    if inner is not bool:
        kwargs["type"] = click.Choice(list(get_args(inner))) if get_origin(inner) is Literal else inner
    kwargs.update(extra)
    return click.option(*decls, f.name, **kwargs)


def _without_none(hint):
    """`int | None` -> int; other annotations unchanged."""
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return inner
    return hint
