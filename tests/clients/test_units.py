"""The pure parts with an injected FakeClock: backoff, budget, breaker, classifier, engine."""

from __future__ import annotations

import asyncio
import random

import grpc
import pybreaker
import pytest
from structlog.testing import capture_logs

from pkg.clients import (
    Backoff,
    BreakerOpenError,
    BreakerPolicy,
    BudgetPolicy,
    Instrumentation,
    Policy,
    RetryEvent,
    RetryPolicy,
    Runtime,
    delays,
    set_testing,
)
from pkg.clients import testing as instant_backoff
from pkg.clients.backoff import ceiling
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
from pkg.clients.budget import RetryBudget
from pkg.clients.classify import classify_grpc, parse_retry_after
from pkg.clients.deadline import deadline_scope
from pkg.clients.engine import call_async, call_sync
from pkg.clients.grpc_core import ClientCore, status_error
from pkg.clients.policy import DEFAULT_BREAKER_FAILURE_CODES
from pkg.common.clock import FakeClock

# -- backoff ---------------------------------------------------------------------------------


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


# -- breaker ---------------------------------------------------------------------------------


def make_breaker(clock: FakeClock, **kw: object) -> CircuitBreaker:
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


def test_failed_probe_reopens_for_the_full_open_duration() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, min_calls=1)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(5.0)
    probe = breaker.admit(clock.monotonic())
    breaker.record(probe, BREAKER_FAILURE, clock.monotonic())
    assert breaker.state == STATE_OPEN
    assert breaker.retry_after() == pytest.approx(5.0)


def test_cancelled_or_inconclusive_probe_frees_the_slot_for_the_next_caller() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, min_calls=1)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(5.0)
    breaker.release(breaker.admit(clock.monotonic()))  # cancelled probe
    probe = breaker.admit(clock.monotonic())  # next caller probes at once
    breaker.record(probe, BREAKER_IGNORE, clock.monotonic())  # a domain error proves nothing
    assert breaker.state == STATE_HALF_OPEN
    probe = breaker.admit(clock.monotonic())
    breaker.record(probe, BREAKER_SUCCESS, clock.monotonic())
    assert breaker.state == STATE_CLOSED


def test_probe_that_never_reports_is_replaced_after_probe_timeout() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, min_calls=1, probe_timeout=2.0)
    now = clock.monotonic()
    breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
    clock.advance(5.0)
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


# -- classifier ------------------------------------------------------------------------------


def verdict(code: grpc.StatusCode, details: str = "boom", **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "idempotent": True,
        "attempt_capped": False,
        "time_left": 1.0,
        "failure_codes": DEFAULT_BREAKER_FAILURE_CODES,
    }
    args.update(kw)
    return classify_grpc(status_error(code, details), **args)  # type: ignore[arg-type]


def test_classifier_rules_each_with_a_reason() -> None:
    assert verdict(grpc.StatusCode.UNAVAILABLE).retryable
    assert not verdict(grpc.StatusCode.UNAVAILABLE, idempotent=False).retryable
    never_left = verdict(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: Connection refused",
        idempotent=False,
    )
    assert never_left.retryable and "never sent" in never_left.reason
    assert verdict(grpc.StatusCode.DEADLINE_EXCEEDED, attempt_capped=True).retryable
    spent = verdict(grpc.StatusCode.DEADLINE_EXCEEDED, attempt_capped=True, time_left=0.0)
    assert not spent.retryable and "overall deadline" in spent.reason
    assert not verdict(grpc.StatusCode.DEADLINE_EXCEEDED).retryable
    for code in (
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        result = verdict(code)
        assert not result.retryable and result.reason
    assert verdict(grpc.StatusCode.NOT_FOUND).breaker == BREAKER_IGNORE
    assert verdict(grpc.StatusCode.UNAVAILABLE).breaker == BREAKER_FAILURE
    opened = classify_grpc(
        BreakerOpenError("t", 1.0, STATE_OPEN),
        idempotent=True,
        attempt_capped=False,
        time_left=1.0,
        failure_codes=DEFAULT_BREAKER_FAILURE_CODES,
    )
    assert not opened.retryable and "breaker" in opened.reason


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


# -- engine with a fake transport --------------------------------------------------------------


class Recorder(Instrumentation):
    def __init__(self) -> None:
        self.events: list[RetryEvent] = []
        self.budget: int = 0

    def on_retry_decision(self, event: RetryEvent) -> None:
        self.events.append(event)

    def on_budget_exhausted(self, target: str, method: str) -> None:
        self.budget += 1


def engine(policy: Policy, clock: FakeClock, method: str = "/svc.v1.S/GetX"):  # type: ignore[no-untyped-def]
    recorder = Recorder()
    runtime = Runtime(clock=clock, rng=random.Random(3), instrumentation=[recorder])
    state, classify = ClientCore(policy, runtime, "t:1", None).method(method)
    return state, classify, recorder


def failing_attempts(codes: list[grpc.StatusCode], clock: FakeClock, cost: float = 0.01):  # type: ignore[no-untyped-def]
    seen: list[float] = []

    async def attempt(timeout: float) -> str:
        seen.append(timeout)
        await clock.asleep(cost)
        if len(seen) <= len(codes):
            raise status_error(codes[len(seen) - 1], "scripted")
        return "ok"

    return attempt, seen


async def test_retries_until_success_and_explains_each_decision() -> None:
    clock = FakeClock()
    state, classify, rec = engine(Policy(timeout=5.0), clock)
    attempt, seen = failing_attempts([grpc.StatusCode.UNAVAILABLE] * 2, clock)
    assert await call_async(state, None, attempt, classify) == "ok"
    assert len(seen) == 3
    assert [e.retry for e in rec.events] == [True, True]
    assert all(e.reason == "UNAVAILABLE" for e in rec.events)
    assert seen[0] == pytest.approx(5.0)  # first attempt gets the whole deadline
    assert seen[2] < seen[0]  # later attempts get only what is left


async def test_retry_is_skipped_when_backoff_plus_a_call_cannot_fit_the_deadline() -> None:
    clock = FakeClock()
    policy = Policy(timeout=0.5, retry=RetryPolicy(base_backoff=1.0, max_backoff=1.0))
    state, classify, rec = engine(policy, clock)
    attempt, seen = failing_attempts([grpc.StatusCode.UNAVAILABLE] * 5, clock, cost=0.3)
    rng_delays = []
    while True:  # find a seed whose first full-jitter delay cannot fit in the 0.2 s left
        state.runtime.rng.seed(len(rng_delays))
        d = state.runtime.rng.uniform(0, 1.0)
        rng_delays.append(d)
        if d > 0.2:
            state.runtime.rng.seed(len(rng_delays) - 1)
            break
    start = clock.monotonic()
    with pytest.raises(grpc.RpcError):
        await call_async(state, None, attempt, classify)
    assert len(seen) == 1
    assert "deadline" in rec.events[-1].reason and not rec.events[-1].retry
    assert clock.monotonic() - start <= 0.5


async def test_pushback_replaces_backoff_and_negative_pushback_stops() -> None:
    clock = FakeClock()
    state, classify, rec = engine(Policy(timeout=5.0), clock)

    class Pushback(grpc.RpcError):
        def __init__(self, ms: str) -> None:
            self.ms = ms

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "busy"

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("grpc-retry-pushback-ms", self.ms),)

    calls: list[float] = []

    async def attempt(timeout: float) -> str:
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise Pushback("750")
        return "ok"

    assert await call_async(state, None, attempt, classify) == "ok"
    assert calls[1] - calls[0] == pytest.approx(0.75)

    async def stop(timeout: float) -> str:
        raise Pushback("-1")

    with pytest.raises(Pushback):
        await call_async(state, None, stop, classify)
    assert "pushback" in rec.events[-1].reason and not rec.events[-1].retry


async def test_budget_caps_retries_in_a_total_outage() -> None:
    clock = FakeClock()
    policy = Policy(breaker=BreakerPolicy(enabled=False), budget=BudgetPolicy(max_tokens=10))
    state, classify, rec = engine(policy, clock)
    sent = 0

    async def down(timeout: float) -> str:
        nonlocal sent
        sent += 1
        raise status_error(grpc.StatusCode.UNAVAILABLE, "down")

    for _ in range(100):
        with pytest.raises(grpc.RpcError):
            await call_async(state, None, down, classify)
    assert sent <= 100 + 5
    assert rec.budget >= 90


async def test_outer_deadline_scope_shrinks_the_call_deadline() -> None:
    clock = FakeClock()
    state, classify, _ = engine(Policy(timeout=10.0), clock)
    attempt, seen = failing_attempts([], clock)
    with deadline_scope(0.25, clock):
        await call_async(state, 5.0, attempt, classify)
    assert seen[0] == pytest.approx(0.25)


async def test_per_attempt_timeout_is_retried_but_not_past_the_overall_deadline() -> None:
    clock = FakeClock()
    policy = Policy(
        timeout=1.0, retry=RetryPolicy(max_attempts=5, attempt_timeout=0.3, base_backoff=0.0)
    )
    state, classify, rec = engine(policy, clock)
    seen: list[float] = []

    async def slow(timeout: float) -> str:
        seen.append(timeout)
        await clock.asleep(timeout)
        raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    with pytest.raises(grpc.RpcError):
        await call_async(state, None, slow, classify)
    assert seen[:3] == [pytest.approx(0.3)] * 3
    assert sum(seen) == pytest.approx(1.0)  # the last attempt only got what was left
    assert rec.events[-1].reason.startswith("overall deadline spent")


def test_sync_engine_retries_and_never_retries_domain_errors() -> None:
    clock = FakeClock()
    state, classify, _ = engine(Policy(), clock)
    calls = 0

    def not_found(timeout: float) -> str:
        nonlocal calls
        calls += 1
        raise status_error(grpc.StatusCode.NOT_FOUND, "no such node")

    with pytest.raises(grpc.RpcError):
        call_sync(state, None, not_found, classify)
    assert calls == 1
    with capture_logs() as logs:
        calls = 0

        def flaky(timeout: float) -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise status_error(grpc.StatusCode.UNAVAILABLE, "x")
            return "ok"

        state2, classify2, _ = engine(Policy(), clock, "/svc.v1.S/GetY")
        from pkg.clients.telemetry import StructlogInstrumentation

        state2.runtime.hooks = (StructlogInstrumentation(),)
        assert call_sync(state2, None, flaky, classify2) == "ok"
    assert [entry["event"] for entry in logs] == ["retry", "retry"]
    assert logs[0]["reason"] == "UNAVAILABLE"


async def test_cancellation_is_never_retried_and_releases_the_probe() -> None:
    clock = FakeClock()
    policy = Policy(breaker=BreakerPolicy(min_calls=1, open_duration=1.0))
    state, classify, _ = engine(policy, clock)
    breaker = state.breaker
    assert breaker is not None
    breaker.force(STATE_OPEN, open_for=0.0)
    started = asyncio.Event()

    async def hang(timeout: float) -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    task = asyncio.ensure_future(call_async(state, None, hang, classify))
    await started.wait()
    assert breaker.state == STATE_HALF_OPEN
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.admit(clock.monotonic()) == TICKET_PROBE  # not stranded


# -- channel wiring ----------------------------------------------------------------------------


def test_channels_disable_grpc_retries_set_keepalive_and_round_robin() -> None:
    from pkg.clients.grpc_core import channel_options
    from pkg.clients.targets import resolve_targets

    single = dict(channel_options(resolve_targets("127.0.0.1:1")))
    assert single["grpc.enable_retries"] == 0
    assert single["grpc.keepalive_time_ms"] == 20_000
    assert "grpc.lb_policy_name" not in single
    multi = dict(channel_options(resolve_targets(["127.0.0.1:1", "127.0.0.1:2"])))
    assert multi["grpc.lb_policy_name"] == "round_robin"
    assert multi["grpc.enable_retries"] == 0


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


def test_channels_sharing_a_runtime_keep_their_own_policy_but_share_budget_and_breaker() -> None:
    runtime = Runtime(clock=FakeClock())
    short = ClientCore(Policy(timeout=1.0), runtime, "svc:1", None)
    long = ClientCore(Policy(timeout=7.0), runtime, "svc:1", None)
    a, _ = short.method("/s.v1.S/GetA")
    b, _ = long.method("/s.v1.S/GetA")
    assert (a.timeout, b.timeout) == (1.0, 7.0)
    assert a.budget is b.budget and a.breaker is b.breaker


def test_deadline_of_an_incoming_call_is_propagated() -> None:
    from pkg.clients.deadline import current_deadline, deadline_from_grpc

    clock = FakeClock()

    class Context:
        def time_remaining(self) -> float:
            return 0.75

    with deadline_from_grpc(Context(), clock) as absolute:
        assert absolute == pytest.approx(clock.monotonic() + 0.75)
        with deadline_scope(5.0, clock):  # an inner scope can only shrink it
            assert current_deadline() == pytest.approx(clock.monotonic() + 0.75)
    assert current_deadline() is None


async def test_breaker_opening_mid_call_ends_retries_with_the_real_error() -> None:
    clock = FakeClock()
    policy = Policy(breaker=BreakerPolicy(min_calls=1))
    state, classify, rec = engine(policy, clock)

    async def down(timeout: float) -> str:
        raise status_error(grpc.StatusCode.UNAVAILABLE, "down")

    with pytest.raises(grpc.RpcError) as info:
        await call_async(state, None, down, classify)
    assert not isinstance(info.value, BreakerOpenError)
    assert rec.events[-1].reason == "UNAVAILABLE; circuit breaker opened"
    with pytest.raises(BreakerOpenError):  # the next call fails fast
        await call_async(state, None, down, classify)


async def test_hedges_cost_budget_tokens_and_stop_when_it_is_drained() -> None:
    from pkg.clients import HedgePolicy

    clock = FakeClock()
    policy = Policy(hedge=HedgePolicy(enabled=True, delay=0.0, max_attempts=3))
    state, classify, rec = engine(policy, clock)
    started = 0

    async def slow_first(timeout: float) -> str:
        nonlocal started
        started += 1
        mine = started
        await asyncio.sleep(0.05 if mine == 1 else 0.0)
        return f"attempt {mine}"

    with instant_backoff():
        assert await call_async(state, None, slow_first, classify) != "attempt 1"
    assert started >= 2
    tokens_after_hedges = state.budget.tokens
    assert tokens_after_hedges <= 10 - (started - 1) + 0.1  # each hedge took a token

    state.budget.tokens = 0.0  # drained: no more hedges
    started = 0
    with instant_backoff():
        assert await call_async(state, None, slow_first, classify) == "attempt 1"
    assert started == 1 and rec.budget >= 1
