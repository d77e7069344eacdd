"""Coordination history: what a replica held, with which token, and when (for the checker).

With ``PLATFORM_HISTORY=1`` (read by the one config loader) every replica logs one ``history``
line per acquisition, renewal, release or loss of a lease, ownership or partition, and per
write a store accepted under a fencing token. ``devtools.checker`` reads these lines from the
replicas' logs after a drill and verifies that tokens only grow per resource, that no two
holders overlapped and that no superseded holder's write was accepted. Off by default: the
write path then pays one attribute check.

Fields of a line: ``kind`` (``ownership``, ``lease``, ``partition``), ``resource`` (node id,
lease key, ``topic/partition``), ``op`` (``acquire``, ``renew``, ``release``, ``lost``,
``write``), ``token`` (fence or epoch), ``holder`` (replica id), ``t`` (wall-clock seconds when
the outcome was known), and for writes ``t_sent`` (when the write left the replica: the store
judged it between ``t_sent`` and ``t``); a lease's acquire and renew carry ``valid_until`` (the
wall-clock end of the holder's own view of its term).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from pkg.common.config import load

log = structlog.get_logger("history")


@dataclass
class HistoryConfig:
    history: bool = False  # PLATFORM_HISTORY


class _State:
    enabled: bool | None = None


def enabled() -> bool:
    """Whether this process records history (``PLATFORM_HISTORY``, read once)."""
    if _State.enabled is None:
        _State.enabled = load(HistoryConfig, "PLATFORM").history
    return _State.enabled


def set_enabled(on: bool | None) -> None:
    """Force recording on or off (tests); None reads ``PLATFORM_HISTORY`` again."""
    _State.enabled = on


def record(kind: str, resource: str, op: str, token: int, holder: str, **extra: Any) -> None:
    """Log one history line (a no-op unless enabled)."""
    if not enabled():
        return
    log.info(
        "history",
        kind=kind,
        resource=resource,
        op=op,
        token=int(token),
        holder=holder,
        t=round(time.time(), 6),
        **extra,
    )


def now() -> float:
    """Wall-clock seconds, as the lines carry them (``t_sent`` is taken with this)."""
    return round(time.time(), 6)


def wall_of(monotonic_deadline: float, now_monotonic: float) -> float:
    """A monotonic deadline as wall-clock seconds (for ``valid_until``)."""
    return round(time.time() + (monotonic_deadline - now_monotonic), 6)
