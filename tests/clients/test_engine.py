"""The call engine with a scripted transport on a FakeClock: retries, deadlines, budget, hedges."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from structlog.testing import capture_logs

from pkg.clients import (
    BreakerOpenError,
    BreakerPolicy,
    BudgetPolicy,
    HedgePolicy,
    Instrumentation,
    Policy,
    RetryEvent,
    RetryPolicy,
    Runtime,
)
from pkg.clients import testing as instant_backoff
from pkg.clients.breaker import (
    STATE_HALF_OPEN,
    STATE_OPEN,
    TICKET_PROBE,
)
from pkg.clients.deadline import current_deadline, deadline_from_grpc, deadline_scope
from pkg.clients.engine import call_async, call_sync
from pkg.clients.grpc_core import ClientCore
from pkg.clients.telemetry import StructlogInstrumentation
from pkg.common.clock import FakeClock
from tests.clients.conftest import status_error


class Recorder(Instrumentation):
    def __init__(self) -> None:
        self.events: list[RetryEvent] = []
        self.budget: int = 0

    def on_retry_decision(self, event: RetryEvent) -> None:
        self.events.append(event)

    def on_budget_exhausted(self, target: str, method: str) -> None:
        self.budget += 1


# The contract of TestService.Unary declares it IDEMPOTENT (proto/testsvc/v1/testsvc.proto).
IDEMPOTENT_METHOD = "/testsvc.v1.TestService/Unary"


def engine(policy: Policy, clock: FakeClock, method: str = IDEMPOTENT_METHOD):  # type: ignore[no-untyped-def]
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

        state2, classify2, _ = engine(Policy(), clock, "/testsvc.v1.TestService/Echo")
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


def test_channels_sharing_a_runtime_keep_their_own_policy_but_share_budget_and_breaker() -> None:
    runtime = Runtime(clock=FakeClock())
    short = ClientCore(Policy(timeout=1.0), runtime, "svc:1", None)
    long = ClientCore(Policy(timeout=7.0), runtime, "svc:1", None)
    a, _ = short.method("/s.v1.S/GetA")
    b, _ = long.method("/s.v1.S/GetA")
    assert (a.timeout, b.timeout) == (1.0, 7.0)
    assert a.budget is b.budget and a.breaker is b.breaker


def test_deadline_of_an_incoming_call_is_propagated() -> None:
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


def test_client_streaming_calls_get_a_deadline_and_fail_fast_on_an_open_breaker() -> None:
    # Client streams cannot be replayed, so they are never retried: they get the call's own
    # deadline (else the policy's) and are kept off a callee whose breaker is open.
    class Details:
        method = "/svc.v1.S/Upload"
        timeout: float | None = None

    clock = FakeClock()
    rejected: list[str] = []

    class Rejections(Instrumentation):
        def on_breaker_rejected(self, name: str, retry_after: float) -> None:
            rejected.append(name)

    runtime = Runtime(clock=clock, instrumentation=[Rejections()])
    core = ClientCore(Policy(timeout=4.0), runtime, "svc:1", None)
    details = Details()
    assert core.client_streaming_timeout(details) == 4.0
    details.timeout = 1.5
    assert core.client_streaming_timeout(details) == 1.5
    runtime.breakers["svc:1"].force(STATE_OPEN, open_for=10.0)
    with pytest.raises(BreakerOpenError):
        core.client_streaming_timeout(details)
    assert rejected == ["svc:1"]
