"""`student train`'s options, generated from the fields of `TrainConfig` and `LossConfig`.

Every option's flag, type, choices, default and help come from its field (name, annotation, default,
docstring), so a setting is defined once, in student/config.py:

    field `batch_size: int = 8` + docstring  ->  --batch-size INTEGER  "<docstring>  [default: 8]"
    `x: bool = False`                        ->  --x            (a flag that sets it)
    `x: bool = True`                         ->  --no-x         (a flag that clears it)
    `x: Literal["a", "b"]`                   ->  --x [a|b]
    `method`                                 ->  --method [genrecal|...]: the methods student/methods.py declares,
                                                 each one's line before the field's docstring
    `layout`                                 ->  --layout [...]: the Recalibrator layouts of student/layouts.py
    a field without default                  ->  a required option (unless it may be None)
    LossConfig's fields                      ->  options of their own, gathered into TrainConfig.loss
"""

from __future__ import annotations

import dataclasses
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import click

from schemas.dataclass_io import field_docs
from student.config import LossConfig, TrainConfig
from student.layouts import LAYOUTS, layouts_help
from student.methods import METHODS, methods_help

# fields set from code only (tests, benches), or nested
NOT_OPTIONS = {"loss", "sample_ids"}
# where click can check more than the annotation says
CLICK_TYPES = {
    "cache": click.Path(exists=True, file_okay=False),
    "out": click.Path(file_okay=False),
    "stage": click.IntRange(1, 3),
    "method": click.Choice(tuple(METHODS)),
    "layout": click.Choice(tuple(LAYOUTS)),
}
# help that comes from elsewhere than the field's docstring, put before it
HELP_BEFORE = {"method": methods_help(), "layout": layouts_help()}
SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _option(name: str, annotation, default, doc: str) -> tuple[list[str], dict]:
    """(declarations, attributes) of the click option of one config field."""
    flag = name.replace("_", "-")
    doc = f"{HELP_BEFORE[name]} {doc}" if name in HELP_BEFORE else doc
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
    if optional:
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if annotation is bool:
        if default is True:  # the flag turns it off; the config field keeps the positive name
            return [f"--no-{flag}", f"no_{name}"], {"is_flag": True, "help": f"Turn off (on by default): {doc}"}
        return [f"--{flag}", name], {"is_flag": True, "help": doc}
    if name in CLICK_TYPES:
        kind = CLICK_TYPES[name]
    elif get_origin(annotation) is Literal:
        kind = click.Choice(get_args(annotation))
    elif annotation in SCALARS:
        kind = SCALARS[annotation]
    else:
        raise TypeError(f"config field {name}: no CLI option for type {annotation!r}; add it to NOT_OPTIONS")
    required = default is dataclasses.MISSING and not optional
    default = None if default is dataclasses.MISSING else default
    return [f"--{flag}", name], {"type": kind, "required": required, "default": default,
                                 "show_default": default is not None, "help": doc}


def _options_of(cls) -> list[tuple[list[str], dict]]:
    hints, docs = get_type_hints(cls), field_docs(cls)
    return [_option(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)
            if f.name not in NOT_OPTIONS]


def config_options(command):
    """Decorator: add the options of every TrainConfig and LossConfig field to a click command."""
    for decls, attrs in reversed(_options_of(TrainConfig) + _options_of(LossConfig)):
        command = click.option(*decls, **attrs)(command)
    return command


def _fields_from(cls, options: dict) -> dict:
    """The keyword arguments of `cls` in the parsed `options` (negated flags turned back into the field)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f"no_{f.name}" in options:
            kwargs[f.name] = not options[f"no_{f.name}"]
        elif f.name in options:
            kwargs[f.name] = options[f.name]
    return kwargs


def train_config_from_options(options: dict) -> TrainConfig:
    """TrainConfig of the parsed `student train` options (those config_options added)."""
    return TrainConfig(loss=LossConfig(**_fields_from(LossConfig, options)), **_fields_from(TrainConfig, options))
