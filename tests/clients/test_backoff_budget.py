"""Backoff with full jitter, the testing switch and the retry budget (no network)."""

from __future__ import annotations

import random

import pytest

from pkg.clients import (
    Backoff,
    BudgetPolicy,
    delays,
    set_testing,
)
from pkg.clients import testing as instant_backoff
from pkg.clients.backoff import ceiling
from pkg.clients.budget import RetryBudget
from pkg.common.clock import FakeClock


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    waits = list(zip(range(1, 9), delays(0.1, 1.0, 2.0, rng=rng), strict=False))
    for attempt, wait in waits:
        assert 0 <= wait <= ceiling(attempt, 0.1, 1.0, 2.0)
    assert ceiling(1, 0.1, 1.0) == pytest.approx(0.1)
    assert ceiling(3, 0.1, 1.0) == pytest.approx(0.4)
    assert ceiling(50, 0.1, 1.0) == 1.0
    assert len({round(w, 6) for _, w in waits}) > 4  # jittered, not a fixed ladder


async def test_backoff_sleeps_on_the_injected_clock_and_resets() -> None:
    clock = FakeClock()
    backoff = Backoff(0.5, 4.0, clock=clock, rng=random.Random(1))
    start = clock.monotonic()
    total = sum([await backoff.wait() for _ in range(3)])
    assert clock.monotonic() - start == pytest.approx(total)
    assert backoff.attempt == 3
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_testing_switch_makes_backoff_instant() -> None:
    with instant_backoff():
        assert all(d == 0 for d, _ in zip(delays(1.0, 10.0), range(5), strict=False))
    assert any(d > 0 for d, _ in zip(delays(1.0, 10.0), range(5), strict=False))
    set_testing(True)
    try:
        assert Backoff(1.0, 2.0).next_delay() == 0
    finally:
        set_testing(False)


# -- budget ----------------------------------------------------------------------------------


def test_budget_stops_retries_when_drained_and_successes_refill_it() -> None:
    budget = RetryBudget(BudgetPolicy(max_tokens=10, token_ratio=0.5))
    allowed = 0
    for _ in range(20):
        budget.on_failure()
        if budget.can_retry():
            allowed += 1
    assert allowed == 4  # 10 -> 5: retries stop at half the bucket
    assert budget.exhausted == 16
    assert budget.tokens == 0  # drained, never negative
    for _ in range(10):
        budget.on_success()  # +0.5 each: 0 -> 5, still not above half
    assert not budget.can_retry()
    budget.on_success()
    assert budget.can_retry()
