"""Strict conversion between frozen dataclasses and JSON-ready dicts.

`from_dict` checks every field against its type annotation and names the file and
the dotted field path in its error, so a bad cache file is reported as
"shards/x/index.json: field 'arrays.features.shape[1]': expected int, got str".
Unknown fields are errors too: within one format version the field set is fixed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from schemas.errors import CacheFormatError


def to_dict(obj: Any) -> Any:
    """Plain JSON-ready structure (tuples become lists) of a dataclass instance."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: Any, where: str, path: str = "") -> Any:
    """Build `cls` from `data`, validating types; errors name `where` (a file) and the field."""
    if not isinstance(data, dict):
        raise CacheFormatError(f"{where}: {_label(path)}expected an object, got {_kind(data)}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CacheFormatError(f"{where}: unknown field(s) {', '.join(_join(path, u) for u in unknown)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields:
        field_path = _join(path, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CacheFormatError(f"{where}: missing field '{field_path}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], where, field_path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # raised by __post_init__ consistency checks
        raise CacheFormatError(f"{where}: {_label(path)}{err}") from None


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, path)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise CacheFormatError(f"{where}: field '{path}': expected one of {allowed}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise CacheFormatError(f"{where}: field '{path}': expected a list, got {_kind(value)}")
        item_type = get_args(tp)[0]
        return tuple(_convert(item_type, v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise CacheFormatError(f"{where}: field '{path}': expected an object, got {_kind(value)}")
        value_type = get_args(tp)[1]
        return {k: _convert(value_type, v, where, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, path)
    return _convert_scalar(tp, value, where, path)


def _convert_scalar(tp: type, value: Any, where: str, path: str) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if tp not in ok:
        raise TypeError(f"unsupported annotation {tp!r} at {path}")
    if not ok[tp]:
        raise CacheFormatError(
            f"{where}: field '{path}': expected {tp.__name__}, got {_kind(value)} ({value!r:.60})"
        )
    return float(value) if tp is float else value


def json_schema(cls: type, title: str | None = None) -> dict:
    """JSON Schema (draft 2020-12) of a dataclass, with each field's docstring as description."""
    schema = _schema_of(cls)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    if title:
        schema["title"] = title
    return schema


def _schema_of(tp: Any) -> dict:
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return {"anyOf": [_schema_of(inner), {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is tuple:
        return {"type": "array", "items": _schema_of(get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(get_args(tp)[1])}
    if dataclasses.is_dataclass(tp):
        hints = get_type_hints(tp)
        docs = field_docs(tp)
        props, required = {}, []
        for f in dataclasses.fields(tp):
            prop = _schema_of(hints[f.name])
            if f.name in docs:
                prop = {"description": docs[f.name], **prop}
            props[f.name] = prop
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        if tp.__doc__:
            out = {"description": inspect.cleandoc(tp.__doc__).split("\n\n")[0], **out}
        return out
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": names[tp]}


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written right under each annotated field (litgpt style)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _label(path: str) -> str:
    return f"field '{path}': " if path else ""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


__all__ = ["to_dict", "from_dict", "json_schema", "field_docs"]
