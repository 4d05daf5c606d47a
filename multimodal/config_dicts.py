"""Nested dicts <-> the config dataclasses of ``multimodal.config``: strict conversion (unknown
keys and values of the wrong kind are errors naming the field) and recursive overrides. Standard
library only."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _checked_scalar(hint: Any, value: Any, path: str, root: str = "config") -> Any:
    """``value`` for a field typed ``hint`` (int, float, bool, str, or Optional of one): JSON and
    YAML give ints for floats (accepted), never bools for numbers or strings for numbers."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return value
    scalar = next((o for o in options if o in _KINDS), None)
    if scalar is None:
        return value
    ok = isinstance(value, scalar) and (scalar is bool or not isinstance(value, bool))
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{root + '.' if root else ''}{path} must be {_KINDS[scalar]}, got {value!r}")
    return value


def config_from_dict(cls: type[T], data: dict[str, Any] | T, path: str = "", root: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error naming the key.
    ``root`` starts the names in errors (``config.text.width``; "" for keyword arguments)."""
    if isinstance(data, cls):
        return data
    where = ".".join(x for x in (root, path) if x) or "arguments"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        kind = "config key(s)" if root else "option(s)"
        raise ValueError(f"unknown {kind}{' in ' + repr(path) if path else ''}: {', '.join(map(repr, unknown))}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{path}.{key}" if path else key
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[Config]: a mapping or null
            part = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
            if part is not None and value is not None and not isinstance(value, dict):
                raise ValueError(f"{'.'.join(x for x in (root, sub) if x)} must be a mapping or null, got {type(value).__name__}")
            hint = part if part is not None and value is not None else hint
        if dataclasses.is_dataclass(hint):
            kwargs[key] = config_from_dict(hint, value, sub, root)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = _checked_scalar(hint, value, sub, root)
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a field given a value of the wrong kind
        raise ValueError(f"{where}: {err}") from None


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (override wins), used to apply user overrides on presets."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
