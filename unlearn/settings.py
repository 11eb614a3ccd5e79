"""Typed settings from the command line and from files: one conversion and one range check for
every settings dataclass (method configs, target presets), with errors that name the setting.

A dataclass states its limits in two class attributes, gathered over its base classes:
``RANGES`` (a :class:`Range` per numeric field) and ``CHOICES`` (the allowed strings).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .io import read_utf8

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


@dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        parts = []
        if self.low > -math.inf:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {self.low:g}")
        if self.high < math.inf:
            parts.append(f"{'below' if self.high_open else 'at most'} {self.high:g}")
        return " and ".join(parts)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1, high_open=True)  # a share that may be 0 but not everything


def key_values(pairs: list[str]) -> dict[str, str]:
    """``["lr=1e-4", "lora=true"]`` -> ``{"lr": "1e-4", "lora": "true"}`` (command-line
    settings, converted later against the dataclass they set)."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} is not key=value")
        found[key] = value
    return found


def convert(name: str, current: Any, value: Any) -> Any:
    """``value`` as the type of the field ``name`` whose current value is ``current``. Strings
    (the command line) are parsed; values from a JSON/TOML/YAML file must already have the
    field's type (a whole number counts as a number)."""
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
        else:
            try:
                return kind(text)
            except ValueError:
                pass
        raise ValueError(f"{name}={value}: expected {_KINDS[kind]}")
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"{name}={value!r}: expected {_KINDS.get(kind, kind.__name__)}, "
                         f"not {type(value).__name__}")
    return value


def _gathered(cls: type, attribute: str) -> dict:
    merged: dict = {}
    for base in reversed(cls.__mro__):
        merged.update(vars(base).get(attribute, {}))
    return merged


def check(settings: Any) -> None:
    """Raise one ValueError naming the first setting that is not finite, out of its range or
    not one of its choices."""
    ranges, choices = _gathered(type(settings), "RANGES"), _gathered(type(settings), "CHOICES")
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value}: must be a finite number")
        if f.name in ranges and not isinstance(value, bool) and value not in ranges[f.name]:
            raise ValueError(f"{f.name}={value}: must be {ranges[f.name]}")
        if f.name in choices and value not in choices[f.name]:
            allowed = ", ".join(repr(c) if c == "" else c for c in choices[f.name])
            raise ValueError(f"{f.name}={value}: use one of {allowed}")


def override(settings: Any, changes: dict[str, Any], what: str) -> Any:
    """A copy of the dataclass ``settings`` with ``changes`` converted and checked; ``what``
    names the settings in the error for an unknown name."""
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for {what}; known: "
                         f"{', '.join(sorted(known))}")
    changed = replace(settings, **{k: convert(k, getattr(settings, k), v)
                                   for k, v in changes.items()})
    check(changed)
    return changed


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The settings in a JSON, TOML or YAML file (by its suffix; UTF-8, a byte-order mark is
    skipped), as one mapping of names to values. Raises ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    parsers = {".json": ("JSON", json.loads), ".toml": ("TOML", tomllib.loads),
               ".yaml": ("YAML", yaml.safe_load), ".yml": ("YAML", yaml.safe_load)}
    if path.suffix.lower() not in parsers:
        raise ValueError(f"{path}: unknown config format; name it .json, .toml, .yaml or .yml")
    kind, parse = parsers[path.suffix.lower()]
    text = read_utf8(path)
    try:
        values = parse(text)
    except (ValueError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a {kind} mapping of setting names to values, "
                         f"found {type(values).__name__}")
    return values
