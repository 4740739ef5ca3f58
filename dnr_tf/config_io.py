"""Strict YAML -> frozen dataclass loading, shared by every entry point.

Unknown keys, wrong types and failed range checks raise `ConfigError` naming the dotted key,
before any work starts. `--set a.b=value` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
# A decimal number as people write it: 1e-4, 5E3, .5, -2.5e+3 (YAML 1.1 reads some of these as strings).
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def load_yaml(path: str) -> dict:
    """Reads a YAML mapping; a missing file or a non-mapping is a `ConfigError`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except (UnicodeDecodeError, yaml.reader.ReaderError):
        raise ConfigError(f"config file {path} is not a text file (binary or not UTF-8)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{line}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Applies `key.sub=value` strings to a nested dict (a copy); values are YAML scalars."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Builds dataclass `cls` from `data`, recursing into nested dataclasses.

    Raises:
        ConfigError: naming the dotted key of an unknown field or a value of the wrong type.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, not {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, not {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, not {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, not {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            # YAML 1.1 reads `1e-4` (no dot) as a string; users write it, so it is a number here.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
        return value
    return value


def to_dict(obj) -> dict:
    """A dataclass as plain, YAML/JSON-friendly data (tuples become lists)."""

    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(obj)


def check(condition: bool, key: str, message: str) -> None:
    """Raises `ConfigError` naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key} {message}")


def check_output_dir(path: str, flag: str) -> None:
    """Fails before any work when `path` cannot be an output directory (a file, or not writable).

    Remote paths (`gs://...`) are left to their filesystem.

    Raises:
        ConfigError: one line naming the flag and the path.
    """
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if existing == os.path.abspath(path) and not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path} is a file, not a directory")
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable (no write permission on {existing})")
