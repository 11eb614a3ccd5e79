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
SEED_RANGE = range(2**32)  # what numpy's seeding (accelerate's set_seed) takes
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 10_000  # a settings file expands to at most this many values (YAML aliases)
_SHOWN = 60  # characters of a value a message repeats


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


def shown(value: Any) -> str:
    """A value as a message repeats it: at most a short line (a value may be megabytes)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` when it is a whole number that seeding accepts (0 to 2**32-1); else one
    ValueError, raised before any work."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEED_RANGE:
        raise ValueError(f"{name}={shown(seed)}: must be a whole number from 0 to "
                         f"{SEED_RANGE.stop - 1}")
    return seed


def key_values(pairs: list[str]) -> dict[str, str]:
    """``["lr=1e-4", "lora=true"]`` -> ``{"lr": "1e-4", "lora": "true"}`` (command-line
    settings, converted later against the dataclass they set)."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {shown(pair)!r} is not key=value")
        found[key] = value
    return found


def convert(name: str, current: Any, value: Any) -> Any:
    """``value`` as the type of the field ``name`` whose current value is ``current``. Strings
    (the command line) are parsed; values from a JSON/TOML/YAML file must already have the
    field's type (a whole number counts as a number)."""
    kind = type(current)
    if isinstance(value, (list, dict)):  # never printed: a YAML alias may make it gigabytes
        raise ValueError(f"{name}: expected {_KINDS.get(kind, kind.__name__)}, not a "
                         f"{'list' if isinstance(value, list) else 'mapping'}")
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
        raise ValueError(f"{name}={shown(value)}: expected {_KINDS[kind]}")
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"{name}={shown(value)}: expected {_KINDS.get(kind, kind.__name__)}, "
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
            raise ValueError(f"{f.name}={shown(value)}: must be {ranges[f.name]}")
        if f.name in choices and value not in choices[f.name]:
            allowed = ", ".join(repr(c) if c == "" else c for c in choices[f.name])
            raise ValueError(f"{f.name}={shown(value)}: use one of {allowed}")


def override(settings: Any, changes: dict[str, Any], what: str) -> Any:
    """A copy of the dataclass ``settings`` with ``changes`` converted and checked; ``what``
    names the settings in the error for an unknown name."""
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {shown(', '.join(unknown))} for {what}; known: "
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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, too large for a settings file "
                         f"(at most {MAX_CONFIG_BYTES:,}); name the settings you change only")
    text = read_utf8(path)
    try:
        if kind == "YAML":
            _check_expansion(path, yaml.compose(text, Loader=yaml.SafeLoader))
        values = parse(text)
    except (ValueError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {kind} ({shown(str(e).splitlines()[0])})") from None
    except _Oversized as e:
        raise ValueError(f"{path}: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply for a settings file; give each setting "
                         f"one value") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a {kind} mapping of setting names to values, "
                         f"found {type(values).__name__}")
    return values


class _Oversized(Exception):
    """A settings file that stands for more values than any settings file needs."""


def _check_expansion(path: Path, root: yaml.Node | None) -> None:
    """Refuse a YAML document whose aliases expand it past :data:`MAX_CONFIG_VALUES` values
    (nested anchors grow it exponentially: a few hundred bytes can stand for gigabytes) or that
    refers to itself. Counts the node graph, each shared node once per use."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise _Oversized("an alias refers to the node that holds it (endless); a settings "
                             "file names each setting once, with one value")
        open_nodes.add(id(node))
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(min(size(child), MAX_CONFIG_VALUES + 1) for child in children)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if root is not None and size(root) > MAX_CONFIG_VALUES:
        raise _Oversized(f"expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors "
                         f"and aliases); a settings file names each setting once, with one value")
