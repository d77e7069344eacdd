"""Overload control: server-side shedding with pushback, and the client's adaptive limit.

The server side runs in a real test service process started with a small bounded queue; the
limiter's arithmetic is also checked as pure logic.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pkg.clients import (
    BreakerPolicy,
    BudgetPolicy,
    Instrumentation,
    LimiterPolicy,
    Policy,
    RetryEvent,
    RetryPolicy,
    Runtime,
    aio_channel,
)
from pkg.clients.limiter import AdaptiveLimiter, LimitExceededError
from pkg.common.shedding import PUSHBACK_KEY, MethodGate, Shed, SheddingPolicy
from pkg.devstack.servers import CommandProcess
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc

WORK = "/testsvc.v1.TestService/Work"


@pytest.fixture
def small_server(process_factory: Callable[..., CommandProcess]) -> str:
    """A test service whose unary methods each run 2 calls at once and queue 2 more."""
    proc = process_factory(
        "testsvc-shed",
        [sys.executable, "-m", "pkg.testsvc.server", "--port", "{port}", "--id", "shed",
         "--max-in-flight", "2", "--max-queue", "2"],
    )  # fmt: skip
    return f"127.0.0.1:{proc.port}"


def _work(seconds: float) -> pb.UnaryRequest:
    return pb.UnaryRequest(key="w", behavior=pb.Behavior(delay_s=seconds))


async def _outcomes(stub: pb_grpc.TestServiceStub, n: int, seconds: float) -> list[object]:
    async def one() -> object:
        try:
            return await stub.Work(_work(seconds), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_past_its_bounded_queue_a_method_sheds_with_pushback(small_server: str) -> None:
    channel = aio_channel(small_server, Policy.no_retries(5.0))
    stub = pb_grpc.TestServiceStub(channel)
    await stub.Echo(pb.EchoRequest(), timeout=5)  # connected before the burst
    outcomes = await _outcomes(stub, 8, 0.3)
    served = [o for o in outcomes if isinstance(o, pb.UnaryReply)]
    shed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(served) == 4  # 2 running + 2 queued
    assert len(shed) == 4
    for error in shed:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        pushback = dict(error.trailing_metadata() or ())[PUSHBACK_KEY]
        assert int(pushback) > 0
    # Health is never shed, even while the method is saturated.
    busy = asyncio.ensure_future(_outcomes(stub, 6, 0.3))
    await asyncio.sleep(0.05)
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await busy
    await channel.close()


async def test_a_call_that_cannot_get_a_slot_before_its_deadline_is_refused_at_once(
    small_server: str,
) -> None:
    channel = aio_channel(small_server, Policy.no_retries(5.0))
    stub = pb_grpc.TestServiceStub(channel)
    await _outcomes(stub, 2, 0.5)  # the server learns the method's service time (0.5 s)
    busy = asyncio.ensure_future(_outcomes(stub, 3, 0.5))  # 2 running, 1 queued
    await asyncio.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Work(_work(0.5), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - start < 0.15  # refused, not left to expire in the queue
    await busy
    await channel.close()


async def test_the_client_retries_shed_idempotent_calls_after_the_pushback(
    small_server: str,
) -> None:
    decisions: list[RetryEvent] = []

    class Decisions(Instrumentation):
        def on_retry_decision(self, event: RetryEvent) -> None:
            decisions.append(event)

    policy = Policy(
        timeout=5.0,
        retry=RetryPolicy(max_attempts=10, base_backoff=0.001, max_backoff=0.001),
        budget=BudgetPolicy(enabled=False),
        breaker=BreakerPolicy(enabled=False),
    )
    channel = aio_channel(small_server, policy, runtime=Runtime(instrumentation=[Decisions()]))
    stub = pb_grpc.TestServiceStub(channel)
    await _outcomes(stub, 2, 0.2)  # the server learns how long Work takes
    outcomes = await _outcomes(stub, 8, 0.2)  # Work is IDEMPOTENT in its contract
    failed = [o for o in outcomes if not isinstance(o, pb.UnaryReply)]
    assert not failed, (failed, [d.reason for d in decisions if not d.retry])
    shed = [d for d in decisions if d.code == "RESOURCE_EXHAUSTED"]
    assert shed and all(d.retry for d in shed)
    assert all(d.delay >= 0.001 and "pushback" in d.reason for d in shed)
    # A write is not retried on RESOURCE_EXHAUSTED: it may be a quota, or partly done.
    writes = await asyncio.gather(
        *(stub.Charge(pb.UnaryRequest(key="c", behavior=pb.Behavior(delay_s=0.3)), timeout=5)
          for _ in range(6)),
        return_exceptions=True,
    )  # fmt: skip
    refused = [w for w in writes if isinstance(w, grpc.aio.AioRpcError)]
    assert refused and all(w.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for w in refused)
    await channel.close()


async def test_the_adaptive_limit_falls_when_the_server_queues_and_excess_fails_fast(
    small_server: str,
) -> None:
    runtime = Runtime()
    policy = Policy(
        timeout=5.0,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(enabled=False),
        limiter=LimiterPolicy(enabled=True, initial_limit=20),
    )
    channel = aio_channel(small_server, policy, runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    rejected = 0
    for _ in range(8):  # waves of 12 calls against 2 slots + 2 queued at the server
        for outcome in await _outcomes(stub, 12, 0.05):
            rejected += isinstance(outcome, LimitExceededError)
    limiter = runtime.limiters[small_server]
    await channel.close()
    assert limiter.limit < 20
    assert rejected > 0
    assert limiter.in_flight == 0


# -- pure logic ----------------------------------------------------------------------------


def test_limit_grows_while_latency_holds_and_the_limit_is_used() -> None:
    limiter = AdaptiveLimiter("t", LimiterPolicy(enabled=True, initial_limit=10))
    for _ in range(10):
        assert limiter.try_acquire()
    assert not limiter.try_acquire()  # busy: the caller uses its whole limit
    for _ in range(20):
        limiter.in_flight += 1
        limiter.release(0.010, False)
    assert limiter.limit > 10


def _complete(limiter: AdaptiveLimiter, calls: int, rtt: float, in_flight: int) -> None:
    """``calls`` calls of latency ``rtt`` complete while ``in_flight`` others stay in flight."""
    for _ in range(calls):
        limiter.in_flight = in_flight + 1
        limiter.release(rtt, False)


def test_limit_shrinks_when_latency_says_calls_queue_and_on_shed_calls() -> None:
    limiter = AdaptiveLimiter("t", LimiterPolicy(enabled=True, initial_limit=40))
    _complete(limiter, 41, 0.010, 40)  # one window at the no-load latency
    assert limiter.limit > 40
    _complete(limiter, 3 * 41, 0.040, 40)  # 4x: most of what is in flight queues at the callee
    assert limiter.limit < 40
    before = limiter.limit
    limiter.in_flight = 41
    limiter.release(None, True)  # shed by the callee
    assert limiter.limit == pytest.approx(before * 0.9)
    for _ in range(5):  # the other sheds of the same burst are the same signal
        limiter.in_flight = 41
        limiter.release(None, True)
    assert limiter.limit == pytest.approx(before * 0.9)


def test_one_slow_call_among_fast_ones_does_not_shrink_the_limit() -> None:
    limiter = AdaptiveLimiter("t", LimiterPolicy(enabled=True, initial_limit=10))
    _complete(limiter, 11, 0.010, 10)
    learnt = limiter.limit
    # A scheduling hiccup in the caller: one call of the window took 3x as long. Per call, the
    # Vegas estimate would read 2/3 of the limit as queued; per window it is noise.
    _complete(limiter, 10, 0.010, 10)
    _complete(limiter, 1, 0.030, 10)
    assert limiter.limit > learnt


def test_a_limit_far_above_what_is_in_flight_falls_from_the_calls_in_flight() -> None:
    limiter = AdaptiveLimiter("t", LimiterPolicy(enabled=True, initial_limit=1000, max_limit=1000))
    limiter.in_flight = 8
    limiter.release(None, True)
    assert limiter.limit == pytest.approx(8 * 0.9)


def test_an_idle_caller_does_not_grow_its_limit() -> None:
    limiter = AdaptiveLimiter("t", LimiterPolicy(enabled=True, initial_limit=10))
    for _ in range(50):
        limiter.in_flight = 1
        limiter.release(0.010, False)
    assert limiter.limit == 10


async def test_over_the_limit_a_call_waits_briefly_for_a_slot_or_fails_fast() -> None:
    limiter = AdaptiveLimiter(
        "t", LimiterPolicy(enabled=True, initial_limit=1, min_limit=1, max_wait=0.2)
    )
    await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    limiter.release(None, False)  # handed to the waiter
    await waiter
    assert limiter.in_flight == 1
    with pytest.raises(LimitExceededError):
        await limiter.acquire()  # nobody releases within max_wait
    limiter.release(None, False)
    assert limiter.in_flight == 0
    assert limiter.rejected == 1


async def test_a_limit_that_grew_lets_every_waiter_it_now_fits_through() -> None:
    limiter = AdaptiveLimiter(
        "t", LimiterPolicy(enabled=True, initial_limit=2, min_limit=1, max_wait=5.0)
    )
    await limiter.acquire()
    await limiter.acquire()
    waiters = [asyncio.ensure_future(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0.01)
    limiter.limit = 4.0  # what a window of fast answers does
    limiter.release(None, False)  # one call ends: three slots are free now, not one
    await asyncio.sleep(0.01)
    assert sum(w.done() for w in waiters) == 3
    assert limiter.in_flight == 4
    await asyncio.gather(*waiters)


async def test_the_server_gate_hands_slots_over_in_order_and_forgets_expired_waiters() -> None:
    gate = MethodGate(SheddingPolicy(max_in_flight=1, max_queue=1, max_queue_wait=0.5))
    await gate.enter(None)
    waiter = asyncio.ensure_future(gate.enter(None))
    await asyncio.sleep(0)
    with pytest.raises(Shed):
        await gate.enter(None)  # the queue is full
    gate.leave(0.01)  # the slot goes to the waiter, not to a newcomer
    await waiter
    assert gate.in_flight == 1
    with pytest.raises(Shed):
        await gate.enter(0.05)  # nobody leaves within its time left
    assert not gate.waiters  # an expired waiter leaves the queue at once
    gate.leave(0.01)
    assert gate.in_flight == 0
