"""`student train`'s options, generated from the fields of `TrainConfig` and `LossConfig`.

Every option's flag, type, choices, default and help come from its field (name, annotation, default,
docstring), so a setting is defined once, in student/config.py:

    field `batch_size: int = 8` + docstring  ->  --batch-size INTEGER  "<docstring>  [default: 8]"
    `x: bool = False`                        ->  --x / --no-x   (either way, so a flag can undo a --config file)
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

from pipeline.config_file import ConfigFile, from_nested, merge
from pipeline.storage_cli import CacheLocation
from schemas.dataclass_io import field_docs
from student.config import LossConfig, TrainConfig
from student.layouts import LAYOUTS, layouts_help
from student.methods import DEFAULT_METHOD, METHODS, method_named, methods_help

# fields set from code only (tests, benches): no option and no --config key
LIBRARY_ONLY = frozenset({"sample_ids"})
# ... and the nested LossConfig, whose fields are options of their own
NOT_OPTIONS = {"loss", *LIBRARY_ONLY}
# where click can check more than the annotation says
CLICK_TYPES = {
    "cache": CacheLocation(),  # a folder, or an object-store URL (s3://, gs://, az://)
    "out": click.Path(file_okay=False),
    "stage": click.IntRange(1, 3),
    "method": click.Choice(tuple(METHODS)),
    "layout": click.Choice(tuple(LAYOUTS)),
}
# help that comes from elsewhere than the field's docstring, put before it
HELP_BEFORE = {"method": methods_help(), "layout": layouts_help()}
# allowed values of str fields whose annotation does not list them, for checking --config files
CHOICES = {name: kind.choices for name, kind in CLICK_TYPES.items() if isinstance(kind, click.Choice)}
SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _option(name: str, annotation, default, doc: str) -> tuple[list[str], dict]:
    """(declarations, attributes) of the click option of one config field."""
    flag = name.replace("_", "-")
    doc = f"{HELP_BEFORE[name]} {doc}" if name in HELP_BEFORE else doc
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
    if optional:
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if annotation is bool:  # both ways, so the command line can undo what a --config file set
        return [f"--{flag}/--no-{flag}", name], {"default": default, "show_default": True, "help": doc}
    if name in CLICK_TYPES:
        kind = CLICK_TYPES[name]
    elif get_origin(annotation) is Literal:
        kind = click.Choice(get_args(annotation))
    elif annotation in SCALARS:
        kind = SCALARS[annotation]
    else:
        raise TypeError(f"config field {name}: no CLI option for type {annotation!r}; add it to NOT_OPTIONS")
    attrs = {"type": kind, "help": doc}
    if default is dataclasses.MISSING:  # no default at all: click 8.3+ takes an explicit default=None as a value
        return [f"--{flag}", name], {**attrs, "required": not optional}
    return [f"--{flag}", name], {**attrs, "default": default, "show_default": default is not None}


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
    """The keyword arguments of `cls` in the parsed `options`."""
    return {f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options}


def train_config_from_options(options: dict) -> TrainConfig:
    """TrainConfig of the parsed `student train` options (those config_options added)."""
    return TrainConfig(loss=LossConfig(**_fields_from(LossConfig, options)), **_fields_from(TrainConfig, options))


CONFIG_HELP = ("A YAML file of these options, keys as the fields of student/config.py nest (loss: {kl_weight: 2.0}); "
               "a flag given here overrides the file, and its stages: block for --stage overrides its top level. "
               "Ready-made recipes (the paper's pairs, VLsI, KD, their dumps, multi-node launches) are in recipes/ "
               "of the repository; OUT/stageN/config.yaml, saved by every run, reruns that stage.")


def stage_configs(loaded: ConfigFile, stages, **given) -> dict[int, TrainConfig]:
    """`student check --config`: the TrainConfig of each of `stages` that the file's method trains or the file has a
    block for (the file's settings for that stage, `given` laid over them: the pair to check it on)."""
    out = {}
    for stage in stages:
        settings = merge(loaded.settings(stage), {**given, "stage": stage})
        if stage in method_named(settings.get("method", DEFAULT_METHOD)).stages or stage in loaded.stages:
            out[stage] = from_nested(TrainConfig, {"out": "check", **settings})
    return out
