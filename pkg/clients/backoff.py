"""Exponential backoff with full jitter, for retries and for reconnect loops.

``delays()`` yields the waits; ``Backoff`` keeps the attempt count across a loop and sleeps on
an injected clock (``reset()`` after a success). Full jitter (``uniform(0, cap_n)``) spreads
reconnecting clients so a restarted server is not hit by all of them at the same instant.

    backoff = Backoff(base=0.1, cap=5.0)
    while True:
        try:
            await connect()
            backoff.reset()
            ...
        except ConnectionError:
            await backoff.wait()
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from pkg.clients import testing
from pkg.common.clock import SYSTEM_CLOCK, Clock


def _finite(value: float) -> bool:
    # policy.finite_number's rule, kept here so that reconnect loops in domain modules
    # (Signalman's hub) can back off without importing the policy module, which imports grpc.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(base: float, cap: float, multiplier: float) -> None:
    if not (_finite(base) and base >= 0):
        raise ValueError(f"backoff base must be a finite number >= 0, got {base!r}")
    if not (_finite(cap) and cap >= base):
        raise ValueError(f"backoff cap must be finite and >= base ({base}), got {cap!r}")
    if not (_finite(multiplier) and multiplier >= 1):
        raise ValueError(f"backoff multiplier must be >= 1, got {multiplier!r}")


def ceiling(attempt: int, base: float, cap: float, multiplier: float = 2.0) -> float:
    """The largest wait before retry number ``attempt`` (1-based): ``min(cap, base*m**(n-1))``."""
    if attempt < 1:
        return 0.0
    # Guard the power against overflow for large attempt numbers.
    exponent = min(attempt - 1, 64)
    return min(cap, base * multiplier**exponent)


def full_jitter(
    attempt: int,
    base: float,
    cap: float,
    multiplier: float = 2.0,
    rng: random.Random | None = None,
) -> float:
    """One full-jitter wait for retry ``attempt``; 0 when the testing switch is on."""
    if testing.is_testing():
        return 0.0
    high = ceiling(attempt, base, cap, multiplier)
    return (rng or random).uniform(0.0, high) if high > 0 else 0.0


def delays(
    base: float = 0.1,
    cap: float = 10.0,
    multiplier: float = 2.0,
    *,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield full-jitter waits forever: attempt 1, 2, 3, ... (stop consuming to stop)."""
    _check(base, cap, multiplier)
    attempt = 0
    while True:
        attempt += 1
        yield full_jitter(attempt, base, cap, multiplier, rng)


class Backoff:
    """Backoff state for one reconnect loop: ``next_delay()``/``wait()``, ``reset()`` on success."""

    def __init__(
        self,
        base: float = 0.1,
        cap: float = 10.0,
        multiplier: float = 2.0,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        _check(base, cap, multiplier)
        self.base = base
        self.cap = cap
        self.multiplier = multiplier
        self.attempt = 0
        self._clock = clock
        self._rng = rng

    def next_delay(self) -> float:
        """Count one more failure and return the wait before the next try."""
        self.attempt += 1
        return full_jitter(self.attempt, self.base, self.cap, self.multiplier, self._rng)

    def reset(self) -> None:
        """Start over after a success: the next failure waits about ``base`` again."""
        self.attempt = 0

    async def wait(self) -> float:
        """Sleep (on the injected clock) for the next delay and return it."""
        delay = self.next_delay()
        await self._clock.asleep(delay)
        return delay

    def wait_sync(self) -> float:
        """Blocking variant of ``wait`` for threads."""
        delay = self.next_delay()
        self._clock.sleep(delay)
        return delay
