"""Typed YAML: a mapping read from a file, `section.key=value` overrides, and dataclasses built from it
with every key checked against the fields and every value against its type hint.

Knows nothing of what a run config means: pretrain/config.py declares the sections and the rules.
Every error is a ConfigError of one line naming the key, the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from data.errors import UserError


class ConfigError(UserError):
    """A config that cannot run: the message names the key, the bad value and the fix."""


def read_mapping(path: str | os.PathLike) -> dict:
    """The mapping YAML file `path` holds ({} if empty)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file (see configs/)")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {describe_yaml_error(e)}; fix the YAML syntax there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """One line: where YAML stopped and why (its own message spans several lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"invalid YAML at {where}{problem or e.__class__.__name__}"


def apply_override(raw: dict, item: str) -> None:
    """Set `raw[a][b] = yaml.safe_load(v)` for `item` = "a.b=v" (in place)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value {text!r} is not valid YAML ({e.__class__.__name__})") from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: dict, where: str):
    """cls(**raw) with every key checked against cls's fields and every value against its type hint."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in section {where!r}; valid keys: {', '.join(fields)}")
    kwargs = {key: coerce(value, hints[key], f"{where}.{key}") for key, value in raw.items()}
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"section {where!r} is missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value, hint, where: str):
    """`value` checked against type `hint` (int, float, str, bool, Optional, Union, Literal, list, tuple, dict).

    ints are accepted for floats, and strings like "1e-3" too (YAML 1.1 reads 1e-3 as a string).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed; expected {_describe(hint)}")
        options = [a for a in args if a is not type(None)]
        # A numeric string is a number when the field takes numbers ("1e4" for `float | str`).
        if float in options and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        for option in options:
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"  # YAML 1.1 reads a bare on / off as true / false
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e4 written as 10000.0
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
                return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if (origin or hint) is tuple else items
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return build_dataclass(hint, value, where)
    else:
        return value  # an annotation we do not check (the dataclass may check it itself)
    raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def to_plain(value):
    """Tuples to lists (yaml.safe_dump writes lists only), recursively."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
