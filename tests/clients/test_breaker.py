"""The circuit breaker's state machine on a FakeClock (no network)."""

from __future__ import annotations

import grpc
import pybreaker
import pytest

from pkg.clients import (
    BreakerOpenError,
    BreakerPolicy,
    Policy,
    Runtime,
)
from pkg.clients.breaker import (
    BREAKER_FAILURE,
    BREAKER_IGNORE,
    BREAKER_SUCCESS,
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    TICKET_PROBE,
    CircuitBreaker,
)
from pkg.common.clock import FakeClock


def make_breaker(clock: FakeClock, **kw: object) -> CircuitBreaker:
    """A breaker "t": ratio 0.5, at least 4 calls, 10 s window, open 5 s (``kw`` overrides)."""
    settings: dict[str, object] = {
        "failure_ratio": 0.5,
        "min_calls": 4,
        "window": 10.0,
        "open_duration": 5.0,
    }
    settings.update(kw)
    return CircuitBreaker("t", BreakerPolicy(**settings), clock)  # type: ignore[arg-type]


def test_breaker_needs_minimum_volume_then_opens_on_failure_ratio() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    now = clock.monotonic()
    for _ in range(3):
        breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    assert breaker.state == STATE_CLOSED  # 3 < min_calls
    breaker.record(breaker.admit(now), BREAKER_SUCCESS, now)
    assert breaker.state == STATE_CLOSED  # the success came last: no failure to re-check yet
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    assert breaker.state == STATE_OPEN  # 4 failures / 5 calls >= 0.5


def test_breaker_window_slides_so_old_failures_expire() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, min_calls=3)
    now = clock.monotonic()
    for _ in range(2):
        breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(11.0)  # past the window
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    assert breaker.state == STATE_CLOSED
    assert breaker.window_counts() == (0, 1)


def test_open_breaker_fails_fast_with_time_until_probe_then_probes_once_and_closes() -> None:
    clock = FakeClock()
    transitions: list[tuple[str, str]] = []

    class Listener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: object, old: object, new: object) -> None:
            transitions.append((old.name, new.name))  # type: ignore[attr-defined]

    breaker = CircuitBreaker(
        "t", BreakerPolicy(min_calls=2, open_duration=5.0), clock, listeners=[Listener()]
    )
    now = clock.monotonic()
    for _ in range(2):
        breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(2.0)
    with pytest.raises(BreakerOpenError) as info:
        breaker.admit(clock.monotonic())
    assert info.value.retry_after == pytest.approx(3.0)
    assert isinstance(info.value, pybreaker.CircuitBreakerError)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    clock.advance(3.0)
    probe = breaker.admit(clock.monotonic())
    assert probe == TICKET_PROBE and breaker.state == STATE_HALF_OPEN
    with pytest.raises(BreakerOpenError):  # exactly one probe in flight
        breaker.admit(clock.monotonic())
    breaker.record(probe, BREAKER_SUCCESS, clock.monotonic())
    assert breaker.state == STATE_CLOSED
    assert transitions == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    assert breaker.storage.state == STATE_CLOSED  # mirrored in pybreaker's storage


def due_for_a_probe(clock: FakeClock, **kw: object) -> CircuitBreaker:
    """A breaker opened by one failure whose open duration (5 s) is over: a probe is due."""
    breaker = make_breaker(clock, min_calls=1, **kw)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(5.0)
    return breaker


def test_failed_probe_reopens_for_the_full_open_duration() -> None:
    clock = FakeClock()
    breaker = due_for_a_probe(clock)
    probe = breaker.admit(clock.monotonic())
    breaker.record(probe, BREAKER_FAILURE, clock.monotonic())
    assert breaker.state == STATE_OPEN
    assert breaker.retry_after() == pytest.approx(5.0)


def test_cancelled_or_inconclusive_probe_frees_the_slot_for_the_next_caller() -> None:
    clock = FakeClock()
    breaker = due_for_a_probe(clock)
    breaker.release(breaker.admit(clock.monotonic()))  # cancelled probe
    probe = breaker.admit(clock.monotonic())  # next caller probes at once
    breaker.record(probe, BREAKER_IGNORE, clock.monotonic())  # a domain error proves nothing
    assert breaker.state == STATE_HALF_OPEN
    probe = breaker.admit(clock.monotonic())
    breaker.record(probe, BREAKER_SUCCESS, clock.monotonic())
    assert breaker.state == STATE_CLOSED


def test_probe_that_never_reports_is_replaced_after_probe_timeout() -> None:
    clock = FakeClock()
    breaker = due_for_a_probe(clock, probe_timeout=2.0)
    breaker.admit(clock.monotonic())  # this probe is lost (thread died, ...)
    with pytest.raises(BreakerOpenError):
        breaker.admit(clock.monotonic())
    clock.advance(2.0)
    assert breaker.admit(clock.monotonic()) == TICKET_PROBE


def test_excluded_outcomes_do_not_count_as_successes() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, min_calls=4)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    for _ in range(10):  # e.g. NOT_FOUND: the server is alive, but it is no success either
        breaker.record(breaker.admit(now), BREAKER_IGNORE, now)
    assert breaker.window_counts() == (0, 2)
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    assert breaker.state == STATE_OPEN


def test_breakers_are_per_target_or_per_method() -> None:
    runtime = Runtime(clock=FakeClock())
    per_target = Policy()
    a = runtime.breaker("svc:1", "/s.v1.S/GetA", per_target)
    assert runtime.breaker("svc:1", "/s.v1.S/GetB", per_target) is a
    assert runtime.breaker("svc:2", "/s.v1.S/GetA", per_target) is not a
    per_method = Policy(breaker=BreakerPolicy(per_method=True))
    other = Runtime(clock=FakeClock())
    x = other.breaker("svc:1", "/s.v1.S/GetA", per_method)
    assert other.breaker("svc:1", "/s.v1.S/GetB", per_method) is not x


def test_slow_calls_open_the_breaker_even_when_they_succeed() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, slow_call_duration=0.5, slow_call_ratio=0.5)
    now = clock.monotonic()
    for elapsed in (0.01, 0.9, 0.01):
        breaker.record(breaker.admit(now), BREAKER_SUCCESS, now, elapsed)
    assert breaker.state == STATE_CLOSED  # 3 < min_calls
    breaker.record(breaker.admit(now), BREAKER_SUCCESS, now, 1.2)
    assert breaker.state == STATE_OPEN  # 2 slow / 4 calls >= 0.5
    # A slow probe re-opens it; a fast one closes it.
    clock.advance(5.0)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_SUCCESS, now, 0.8)
    assert breaker.state == STATE_OPEN
    clock.advance(5.0)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_SUCCESS, now, 0.01)
    assert breaker.state == STATE_CLOSED


def test_without_a_slow_call_duration_latency_never_opens_the_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    now = clock.monotonic()
    for _ in range(20):
        breaker.record(breaker.admit(now), BREAKER_SUCCESS, now, 30.0)
    assert breaker.state == STATE_CLOSED
    with pytest.raises(ValueError, match="slow_call_ratio"):
        BreakerPolicy(slow_call_duration=1.0, slow_call_ratio=0)


def test_a_state_forced_from_a_stale_view_never_undoes_a_probe_that_ended_since() -> None:
    # The shared-state sync reads this count before its counts; a probe that ends while the
    # sync is in flight decides, and the sync's older view does not override it.
    clock = FakeClock()
    breaker = make_breaker(clock, open_duration=1.0)
    breaker.force(STATE_OPEN, open_for=0.0)
    seen = breaker.probe_outcomes
    now = clock.monotonic()
    ticket = breaker.admit(now)
    assert ticket == TICKET_PROBE
    breaker.record(ticket, BREAKER_SUCCESS, now)
    assert breaker.state == STATE_CLOSED
    breaker.force(STATE_OPEN, open_for=0.0, unless_probed_since=seen)  # the stale view
    assert breaker.state == STATE_CLOSED
    breaker.force(STATE_OPEN, open_for=5.0, unless_probed_since=breaker.probe_outcomes)
    assert breaker.state == STATE_OPEN
