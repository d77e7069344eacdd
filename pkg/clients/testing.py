"""The testing switch: make every backoff, pushback wait and hedge delay instant.

Like ``stamina.set_testing``: users of ``pkg.clients`` call ``set_testing(True)`` (or use the
``testing()`` context manager) in their own test suites so retries still happen, and are still
counted, but never wait in real time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pkg.clients.runtime import Runtime, set_default_runtime

_testing = False


def set_testing(enabled: bool = True) -> None:
    """Turn instant backoff on or off for the whole process."""
    global _testing
    _testing = bool(enabled)


def is_testing() -> bool:
    """Whether instant backoff is on."""
    return _testing


@contextmanager
def testing(enabled: bool = True) -> Iterator[None]:
    """Instant backoff inside the ``with`` block; the previous setting is restored after."""
    previous = _testing
    set_testing(enabled)
    try:
        yield
    finally:
        set_testing(previous)


@contextmanager
def fresh_runtime(runtime: Runtime | None = None) -> Iterator[Runtime]:
    """A new process-wide default runtime inside the ``with`` block (breakers, budgets and
    outlier state start empty), the previous one restored after: one test's open breaker or
    spent budget never reaches the next test."""
    fresh = runtime or Runtime()
    previous = set_default_runtime(fresh)
    try:
        yield fresh
    finally:
        set_default_runtime(previous)
