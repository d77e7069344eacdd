"""The testing switch: make every backoff, pushback wait and hedge delay instant.

Like ``stamina.set_testing``: users of ``pkg.clients`` call ``set_testing(True)`` (or use the
``testing()`` context manager) in their own test suites so retries still happen, and are still
counted, but never wait in real time. It is a flag and nothing else (no client machinery is
imported here), so that pure modules using ``pkg.clients.backoff`` stay free of grpc and redis;
a fresh process-wide runtime per test is ``pkg.clients.runtime.fresh_runtime``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
