"""Typed settings sections: dataclasses whose fields carry their help text and their range rule.

A section is a :class:`Section` dataclass whose fields are made with :func:`setting`; ``validate`` checks every
field's rule (and any nested section's), then the section's own cross-field checks (``check``). Values come
from plain data (YAML) through :func:`build_section`, which checks every key and type: an unknown key, a
value of the wrong type or out of range is a ``ConfigError`` naming the dotted key (``sampling.group_size``)
and what was expected. A section given in part keeps the defaults its parent gives the rest.

Settings that moved (the old flat top-level keys) are read with a one-line deprecation warning by
:func:`migrate`, so configs written for an earlier version, and the ``config.yaml`` of old runs, still load.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and the problem."""


# -- fields with help text and a rule ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A range rule: ``test(value)`` must hold; ``text`` completes "<key> must ..." (``be >= 1``)."""

    test: Callable[[Any], bool]
    text: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"be >= {low:g}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"be > {low:g}")


def within(low: float, high: float, *, closed: str = "[]") -> Rule:
    """``low <= v <= high`` with the ends ``closed`` ("[]", "(]", "[)" or "()")."""
    lo_ok = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Rule(lambda v: lo_ok(v) and hi_ok(v), f"be in {closed[0]}{low:g}, {high:g}{closed[1]}")


def one_of(*choices: Any) -> Rule:
    shown = [str(c) for c in choices]
    text = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    return Rule(lambda v: v in choices, f"be {text}")


def matching(pattern: str, text: str) -> Rule:
    return Rule(lambda v: re.fullmatch(pattern, v) is not None, f"be {text}")


def setting(default: Any = dataclasses.MISSING, help: str = "", rule: Rule | None = None, *, factory=None) -> Any:
    """A dataclass field with its help text (shown in configs/README.md) and its range rule."""
    metadata = {"help": help, "rule": rule}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str, **defaults: Any) -> Any:
    """A nested section field; ``defaults`` replace the section class's own (the SFT stage's optimizer)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"help": help, "rule": None})


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


class Section:
    """A group of settings (a dataclass). ``validate(prefix)`` checks the rules; subclasses add ``check``."""

    def validate(self, prefix: str = "") -> Any:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate(f"{prefix}{f.name}.")
                continue
            rule = f.metadata.get("rule")
            if rule is not None and value is not None and not rule.test(value):
                text = rule.text
                if _nullable(hints[f.name]):  # "be a, b or c" -> "be a, b, c or null"
                    text = text.replace(" or ", ", ") + " or null"
                raise ConfigError(f"{prefix}{f.name} must {text}, got {value!r}")
        self.check(prefix)
        return self

    def check(self, prefix: str) -> None:
        """Rules across this section's fields (after every field's own rule passed)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


# -- building sections from plain data, with type checks ------------------------------------------------------


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, base)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of settings, got {type(value).__name__} {value!r}")
        return build_section(tp, value, key + ".", base)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string: accept any string float() understands.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        else:
            number = float(value)
        # an inf learning rate or a nan weight would train to NaN weights without any error
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {_type_name(tp)}")  # a bug in the section's definition


S = TypeVar("S")


def build_section(cls: type[S], values: dict[str, Any], prefix: str = "", base: S | None = None) -> S:
    """``cls`` from ``values``; keys not given keep ``base``'s values (default: ``cls()``'s)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in hints or key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown setting '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, getattr(base, key))
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


# -- settings that moved -------------------------------------------------------------------------------------


def _lookup(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def migrate(
    values: dict[str, Any],
    moved: dict[str, str],
    renamed_values: dict[str, dict[str, str]] | None = None,
    source: str = "config",
) -> dict[str, Any]:
    """``values`` with every setting of ``moved`` (old dotted key -> new) at its new key, and the old spellings
    of ``renamed_values`` (key -> {old: new}) replaced; prints one warning line naming what it changed.
    A mapping at an old key is the new section of that name, not an old setting, and is left alone."""
    changes = []
    for old, new in moved.items():
        parent, last = _lookup(values, old)
        if parent is None or last not in parent or isinstance(parent[last], dict):
            continue
        value = parent.pop(last)
        *new_parents, new_last = new.split(".")
        node = values
        for part in new_parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: '{old}' moved to '{new}', but '{part}' is not a section")
            node = child
        if new_last in node:
            raise ConfigError(f"{source}: both '{old}' (the old name) and '{new}' are given: keep '{new}'")
        node[new_last] = value
        changes.append(f"{old} -> {new}")
    for key, spellings in (renamed_values or {}).items():
        parent, last = _lookup(values, key)
        if parent is not None and isinstance(parent.get(last), str) and parent[last] in spellings:
            changes.append(f"{key}: {parent[last]} -> {spellings[parent[last]]}")
            parent[last] = spellings[parent[last]]
    if changes:
        print(
            f"warning: {source}: deprecated settings, read as {'; '.join(changes)} (configs/README.md)", file=sys.stderr
        )
    return values


# -- YAML files and KEY=VALUE overrides -----------------------------------------------------------------------


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[last] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "run.steps=10"]`` -> a nested dict; values are read as YAML (``null``, lists...)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key.strip()):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        _set_path(tree, key.strip(), value)
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of settings, got {type(values).__name__}")
    return values


class TopLevel(Section):
    """A whole config (``vigor train``'s, ``vigor sft``'s): its sections, the settings that moved, loading."""

    MOVED: ClassVar[dict[str, str]] = {}
    RENAMED_VALUES: ClassVar[dict[str, dict[str, str]]] = {}

    @classmethod
    def migrate(cls, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
        return migrate(values, cls.MOVED, cls.RENAMED_VALUES, source)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Any:
        """Build and validate from plain data (old keys are read with a deprecation warning)."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of settings, got {type(values).__name__}")
        return build_section(cls, cls.migrate(values, source)).validate()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
        """Read ``path`` (YAML), apply ``key=value`` overrides, check everything. Messages name the file."""
        values = cls.migrate(read_yaml(path), str(path)) if path is not None else {}
        values = merge(values, cls.migrate(parse_overrides(overrides or []), "command line"))
        try:
            return build_section(cls, values).validate()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
