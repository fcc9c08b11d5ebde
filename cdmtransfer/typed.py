"""Typed dataclasses from plain data (parsed YAML): unknown keys, wrong types and out-of-range values are refused
with a message naming the key, and a did-you-mean where a close name exists. Generic: it knows nothing of recipes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from cdmtransfer.errors import ConfigError


def value_range(lo=None, hi=None, lo_open=False) -> dict:
    """Field metadata: the allowed numeric range, checked by `from_dict`."""
    return {"range": (lo, hi, lo_open)}


def from_dict(cls, data: Any, where: str, prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and out-of-range values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown key {prefix + str(key)!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], where, f"{prefix}{name}", f.metadata)
    return cls(**kwargs)


def _coerce(tp, value, where: str, key: str, metadata) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, key, metadata)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" from --set or the CLI
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(item_tp, v, where, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            value = _parse_number(value, int, where, key)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            value = _parse_number(value, float, where, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer literal with hundreds of digits
            raise ConfigError(f"{where}: {key} must be finite, got an integer too large for a float") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: {key} must be finite, got {value!r}")
    elif tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        value = str(value)
    _check_range(value, metadata, where, key)
    return value


def _parse_number(text: str, kind, where: str, key: str):
    try:
        return kind(text)
    except ValueError:
        word = "an integer" if kind is int else "a number"
        raise ConfigError(f"{where}: {key} must be {word}, got {text!r}") from None


def _check_range(value, metadata, where: str, key: str) -> None:
    if "range" not in metadata:
        return
    lo, hi, lo_open = metadata["range"]
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise ConfigError(f"{where}: {key} = {value!r} must be {op} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {key} = {value!r} must be <= {hi}")
