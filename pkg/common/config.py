"""The one configuration loader: typed dataclasses filled from environment variables.

Each field ``foo_bar`` of a config dataclass is read from ``<PREFIX>_FOO_BAR``. Types drive the
parsing (str, int, float, bool, ``list[str]`` as comma-separated, optional values); a value that
does not parse raises ``ConfigError`` naming the variable, at start-up, never later.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _parse(name: str, raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "":
            return None
        return _parse(name, raw, args[0])
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        items = [_parse(name, part.strip(), inner) for part in raw.split(",") if part.strip()]
        return items if origin is list else tuple(items)
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r}: expected a boolean (true/false/1/0)")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected {tp.__name__}") from None
    return raw


def load(cls: type[T], prefix: str, env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from ``env`` (default ``os.environ``); ``overrides`` win over the env."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name in overrides:
            values[field.name] = overrides[field.name]
            continue
        var = f"{prefix}_{field.name}".upper()
        if var in env:
            values[field.name] = _parse(var, env[var], hints[field.name])
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc
