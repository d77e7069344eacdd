"""Deadline propagation: an outer deadline that every call made inside it respects.

A server handler that calls another service wraps its work in ``deadline_from_grpc(context)``
(or ``deadline_scope(seconds)``): every ``pkg.clients`` call made inside then uses
``min(own timeout, time left on the incoming call)``, so the callee never works for a caller
that has already given up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pkg.clients.policy import finite_number
from pkg.common.clock import SYSTEM_CLOCK, Clock

# Absolute deadline on the monotonic clock of the process (SYSTEM_CLOCK unless a test injects).
_deadline: ContextVar[float | None] = ContextVar("pkg_clients_deadline", default=None)


def current_deadline() -> float | None:
    """The innermost propagated absolute deadline (monotonic seconds), if any."""
    return _deadline.get()


@contextmanager
def deadline_scope(seconds: float, clock: Clock = SYSTEM_CLOCK) -> Iterator[float]:
    """Calls inside the block finish within ``seconds`` from now (nested scopes only shrink)."""
    if not (finite_number(seconds) and seconds >= 0):
        raise ValueError(f"deadline seconds must be a finite number >= 0, got {seconds!r}")
    absolute = clock.monotonic() + seconds
    outer = _deadline.get()
    if outer is not None and outer < absolute:
        absolute = outer
    token = _deadline.set(absolute)
    try:
        yield absolute
    finally:
        _deadline.reset(token)


@contextmanager
def deadline_from_grpc(context: Any, clock: Clock = SYSTEM_CLOCK) -> Iterator[float | None]:
    """Propagate the deadline of an incoming gRPC call (a servicer ``context``)."""
    remaining = context.time_remaining()
    if remaining is None:
        yield None
        return
    with deadline_scope(max(0.0, float(remaining)), clock) as absolute:
        yield absolute
