"""Config files: YAML whose keys are the fields of a settings dataclass, nested as the dataclasses nest.

    loaded = read_config_file("recipes/genrecal-qwen2-vl-72b-to-2b.yaml", TrainConfig)
    loaded.settings(stage=2)        # nested dict: the top level, then the file's block for stage 2
    from_nested(TrainConfig, {...}) # the dataclass of a nested dict (defaults from the dataclass)
    config_yaml(cfg, header="...")  # the resolved settings as YAML that read_config_file reads back

Besides the fields, a file may hold two sections that are not settings:
    stages:  {1: {...}, 2: {...}}   per-stage settings, for a dataclass with a `stage` field (a recipe's
                                    three stages in one file; the command's --stage picks the block)
    recipe:  {...}                  notes on what the numbers are for (world size, global batch, the dump);
                                    read by the recipe tests, ignored by the commands

Errors (ConfigFileError, a ValueError) name the file, the line, the key's dotted place and the nearest valid
name, or where a key belongs when it is a field of another level. Values are checked against the fields'
annotations here, before any option parser sees them, because only here is the line known. Paths in a file are
read as on the command line (relative to the current folder), so a saved config reruns from the same place.
No default is written here: a key left out keeps its dataclass default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

STAGES_KEY = "stages"
RECIPE_KEY = "recipe"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-4 as a number: YAML 1.1 wants a dot (1.0e-4), and a learning rate
    written the way everyone writes it would otherwise be the string '1e-4'."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


class ConfigFileError(ValueError):
    """A config file that cannot be read as the settings it is for; the message says where and why."""


@dataclass
class ConfigFile:
    path: str
    values: dict  # the settings at the top level, nested as the dataclasses nest
    stages: dict[int, dict] = field(default_factory=dict)  # the `stages:` blocks, validated like `values`
    recipe: dict = field(default_factory=dict)  # the `recipe:` notes, as written

    def settings(self, stage: int | None = None) -> dict:
        """The top-level settings, with the block of `stage` (if the file has one) laid over them."""
        return merge(self.values, self.stages.get(stage, {})) if stage is not None else dict(self.values)


def read_config_file(path: str, cls: type, skip: frozenset[str] = frozenset(),
                     choices: Mapping[str, Sequence] | None = None) -> ConfigFile:
    """Read and check `path` against dataclass `cls`; `skip`: fields a file may not set (library-only ones);
    `choices`: allowed values of str fields whose choices are not in their annotation (e.g. --method)."""
    try:
        with open(path, encoding="utf-8") as f:
            loader = _Loader(f.read())
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read the config file: {err}") from None
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    checker = _Checker(path, loader, skip, dict(choices or {}))
    if root is None:
        return ConfigFile(path, {})
    top = checker.mapping_pairs(root, "")
    sections = {k: v for k, v in top.items() if k in (STAGES_KEY, RECIPE_KEY)}
    values = checker.fields(cls, {k: v for k, v in top.items() if k not in sections}, "")
    stages = checker.stages(cls, sections[STAGES_KEY]) if STAGES_KEY in sections else {}
    recipe = loader.construct_object(sections[RECIPE_KEY][1], deep=True) if RECIPE_KEY in sections else {}
    return ConfigFile(path, values, stages, recipe or {})


class _Checker:
    """Walks the YAML node tree (which keeps line numbers) against the dataclass fields."""

    def __init__(self, path: str, loader, skip: frozenset[str], choices: dict):
        self.path, self.loader, self.skip, self.choices = path, loader, skip, choices

    def fail(self, node, place: str, message: str):
        where = f"{self.path}, line {node.start_mark.line + 1}"
        raise ConfigFileError(f"{where}: {place + ': ' if place else ''}{message}")

    def mapping_pairs(self, node, place: str) -> dict[str, tuple]:
        """key -> (key node, value node) of a YAML mapping."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, place, "expected a mapping of settings (key: value)")
        pairs = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                self.fail(key_node, place, f"a key must be a field name, not {key!r}")
            if key in pairs:
                self.fail(key_node, _join(place, str(key)), "given twice")
            pairs[key] = (key_node, value_node)
        return pairs

    def fields(self, cls: type, pairs: dict[str, tuple], place: str) -> dict:
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in self.skip]
        out = {}
        for key, (key_node, value_node) in pairs.items():
            if key not in names:
                self.fail(key_node, _join(place, str(key)), self.unknown(cls, str(key), names))
            hint = hints[key]
            if dataclasses.is_dataclass(hint):
                out[key] = self.fields(hint, self.mapping_pairs(value_node, _join(place, key)), _join(place, key))
            else:
                value = self.loader.construct_object(value_node, deep=True)
                out[key] = self.value(hint, value, value_node, _join(place, key))
        return out

    def stages(self, cls: type, section: tuple) -> dict[int, dict]:
        key_node, node = section
        if "stage" not in {f.name for f in dataclasses.fields(cls)}:
            self.fail(key_node, STAGES_KEY, f"these settings ({cls.__name__}) have no stages")
        out = {}
        for stage, (stage_key, block) in self.mapping_pairs(node, STAGES_KEY).items():
            place = f"{STAGES_KEY}.{stage}"
            if not isinstance(stage, int):
                self.fail(stage_key, place, "a stage block's key is the stage number (1, 2, 3)")
            pairs = self.mapping_pairs(block, place)
            if "stage" in pairs:
                self.fail(pairs["stage"][0], f"{place}.stage", "a stage block cannot set the stage: its key does")
            out[stage] = self.fields(cls, pairs, place)
        return out

    def unknown(self, cls: type, key: str, names: list[str]) -> str:
        """'unknown key', with the nearest field name, or the level where a field of that name lives."""
        home = _nested_home(cls, key)
        if home:
            return f"unknown key at this level: {key} is a field of {home}; nest it there ({home}: {{{key}: ...}})"
        if key in self.skip:
            return f"{key} cannot be set from a config file"
        near = difflib.get_close_matches(key.replace("-", "_"), names, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"the keys are: {', '.join(names)}"
        return f"unknown key {key!r} for {cls.__name__}; {hint}"

    def value(self, hint, value, node, place: str):
        try:
            value = check_value(hint, value)
        except TypeError as err:
            self.fail(node, place, str(err))
        name = place.rpartition(".")[2]
        allowed = self.choices.get(name)
        if allowed is not None and value is not None and value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
            self.fail(node, place, f"{value!r} is not one of {', '.join(map(str, allowed))}"
                      + (f"; did you mean {near[0]}?" if near else ""))
        return value


def check_value(hint, value):
    """`value` as field type `hint` holds it (YAML lists become tuples, ints floats); TypeError saying what the
    field expects. A tuple field also takes a string, as its command-line option does (--layers every:8)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return check_value(inner, value)
    if origin is Literal:
        if value not in get_args(hint):
            raise TypeError(f"expected one of {', '.join(map(str, get_args(hint)))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {_kind(value)} {value!r}")
        return tuple(check_value(get_args(hint)[0], v) for v in value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    if hint in ok and not ok[hint]:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise TypeError(f"expected {names[hint]}, got {_kind(value)} {value!r}")
    return float(value) if hint is float else value


def _nested_home(cls: type, key: str) -> str | None:
    """The dotted place of a field named `key` in a dataclass nested in `cls` (loss for kl_weight), else None."""
    for f in dataclasses.fields(cls):
        hint = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            if key in {g.name for g in dataclasses.fields(hint)}:
                return f.name
            deeper = _nested_home(hint, key)
            if deeper:
                return f"{f.name}.{deeper}"
    return None


def merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def leaves(nested: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted place -> value of every setting of a nested dict (loss.kl_weight -> 2.0)."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(leaves(value, _join(prefix, key)))
        else:
            out[_join(prefix, key)] = value
    return out


def from_nested(cls: type, nested: dict):
    """`cls` built from a nested dict of checked settings; what it leaves out keeps the field's default."""
    hints = get_type_hints(cls)
    kwargs = {k: from_nested(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in nested.items()}
    return cls(**kwargs)


def to_nested(obj, skip: frozenset[str] = frozenset()) -> dict:
    """The settings of a dataclass instance as a nested dict of YAML-ready values (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_nested(value, skip)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_yaml(obj, header: str = "", skip: frozenset[str] = frozenset()) -> str:
    """YAML of every setting of `obj` (defaults included, so the file says what ran), after `header` as comments."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comments + yaml.safe_dump(to_nested(obj, skip), sort_keys=False, default_flow_style=False)


def _join(place: str, key: str) -> str:
    return f"{place}.{key}" if place else str(key)


def _kind(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
