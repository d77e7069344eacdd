"""The one configuration loader: typed, frozen dataclasses filled from environment variables.

Each field ``foo_bar`` of a config dataclass is read from ``<PREFIX>_FOO_BAR``. Types drive the
parsing (str, int, float, bool, ``list[str]`` as comma-separated, optional values); a value that
does not parse raises ``ConfigError`` naming the variable, at start-up, never later. A field whose
type is itself a dataclass is a *section*: its fields are read with the same prefix (the HA
settings of Foghorn, for example, are ``FOGHORN_CLUSTER``... inside ``FoghornConfig.ha``), unless
the section's class names its own ``PREFIX`` (the platform-wide ``PLATFORM_TLS_*`` section that
every service shares, ``pkg.common.tls.TlsSettings``).

A process refuses variables of its own prefix (and ``PLATFORM_*``) that are not settings
(``check_unknown``): a typo such as ``FOGHORN_CLUSTR`` stops it at start with the closest known
name instead of running silently on the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# Settings shared by every service (read by pkg.common.auth and pkg.common.history).
PLATFORM_PREFIX = "PLATFORM"
PLATFORM_SETTINGS = frozenset({"PLATFORM_TOKENS", "PLATFORM_HISTORY", "PLATFORM_TRACES_DIR"})


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def default_replica_id() -> str:
    """The replica id when none is configured: ``<hostname>-<pid>`` (unique on one host)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """What the settings of every service start with: the replica's name, defaulted here only
    (``<hostname>-<pid>``). A subclass's ``__post_init__`` calls this one first."""

    replica_id: str = ""  # default: <hostname>-<pid>

    def __post_init__(self) -> None:
        if not self.replica_id:
            object.__setattr__(self, "replica_id", default_replica_id())


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


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _section_prefix(tp: Any, prefix: str) -> str:
    """A section is read with the enclosing prefix unless its class names its own."""
    own = getattr(tp, "PREFIX", None)
    return own if isinstance(own, str) and own else prefix


def setting_names(cls: type[Any], prefix: str) -> frozenset[str]:
    """Every environment variable ``cls`` reads (sections included), e.g. ``FOGHORN_HOST``."""
    names: set[str] = set()
    for field, tp in _fields(cls):
        if _is_section(tp):
            names |= setting_names(tp, _section_prefix(tp, prefix))
        else:
            names.add(f"{prefix}_{field.name}".upper())
    return frozenset(names)


def load(cls: type[T], prefix: str, env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from ``env`` (default ``os.environ``); ``overrides`` win over the env."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field, tp in _fields(cls):
        if field.name in overrides:
            values[field.name] = overrides[field.name]
            continue
        if _is_section(tp):
            values[field.name] = load(tp, _section_prefix(tp, prefix), env)
            continue
        var = f"{prefix}_{field.name}".upper()
        if var in env:
            values[field.name] = _parse(var, env[var], tp)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def unknown_settings(
    env: Mapping[str, str], prefixes: Iterable[str], known: Iterable[str]
) -> list[tuple[str, str | None]]:
    """Variables of ``prefixes`` in ``env`` that are not in ``known``, each with the closest
    known name (``difflib``), or None when nothing is close."""
    known_set = set(known)
    heads = tuple(f"{p}_" for p in prefixes)
    found = []
    for name in sorted(env):
        if name.startswith(heads) and name not in known_set:
            close = difflib.get_close_matches(name, sorted(known_set), n=1, cutoff=0.6)
            found.append((name, close[0] if close else None))
    return found


def check_unknown(
    env: Mapping[str, str], prefix: str, known: Iterable[str], docs: str = ""
) -> None:
    """Raise ``ConfigError`` when ``env`` has a ``<prefix>_*`` or ``PLATFORM_*`` variable that
    is not in ``known`` (plus the platform-wide settings); the message names each one and the
    closest known setting."""
    unknown = unknown_settings(env, (prefix, PLATFORM_PREFIX), {*known, *PLATFORM_SETTINGS})
    if not unknown:
        return
    parts = [
        f"{name} is not a setting" + (f" (did you mean {close}?)" if close else "")
        for name, close in unknown
    ]
    where = f"; every setting is listed in {docs}" if docs else ""
    raise ConfigError("; ".join(parts) + where)


def load_settings(
    cls: type[T],
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    also_known: Iterable[str] = (),
    docs: str = "",
    **overrides: Any,
) -> T:
    """What a process does at start: refuse unknown ``<prefix>_*``/``PLATFORM_*`` variables
    (``also_known``: names of the same prefix read by the service's command-line tools), then
    ``load``."""
    env = os.environ if env is None else env
    check_unknown(env, prefix, setting_names(cls, prefix) | set(also_known), docs)
    return load(cls, prefix, env, **overrides)
