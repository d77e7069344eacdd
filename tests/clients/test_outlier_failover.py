"""Outlier ejection against real replica processes: a paused (SIGSTOP) replica drops out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import pytest

from pkg.clients import (
    BreakerPolicy,
    Instrumentation,
    OutlierEvent,
    OutlierPolicy,
    Policy,
    RetryEvent,
    RetryPolicy,
    Runtime,
    aio_channel,
)
from pkg.clients.grpc_aio import ResilientChannel
from pkg.clients.outlier import EJECTED, HEALTHY
from pkg.clients.telemetry import default_instrumentation
from pkg.devstack.servers import CommandProcess
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import TESTSVC, UNAVAILABLE, addresses, both_in_rotation
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]


class Recorder(Instrumentation):
    """Keeps the retry decisions, budget refusals and outlier events of a test."""

    def __init__(self) -> None:
        self.retries: list[RetryEvent] = []
        self.outliers: list[OutlierEvent] = []
        self.budget_exhausted = 0

    def on_retry_decision(self, event: RetryEvent) -> None:
        self.retries.append(event)

    def on_budget_exhausted(self, target: str, method: str) -> None:
        self.budget_exhausted += 1

    def on_outlier(self, event: OutlierEvent) -> None:
        self.outliers.append(event)


def recorded_channel(
    replicas: Sequence[CommandProcess], policy: Policy, *hooks: Instrumentation
) -> tuple[ResilientChannel, Recorder]:
    """A channel over ``replicas`` with outlier ejection, and the recorder of its events."""
    recorder = Recorder()
    runtime = Runtime(instrumentation=[recorder, *hooks])
    channel = aio_channel(addresses(*replicas), policy, runtime=runtime)
    assert isinstance(channel, ResilientChannel) and channel.detector is not None
    return channel, recorder


def policy(
    base_ejection_time: float = 1.0, attempt_timeout: float = 0.2, timeout: float = 2.0
) -> Policy:
    return Policy(
        timeout=timeout,
        retry=RetryPolicy(
            max_attempts=3,
            base_backoff=0.01,
            max_backoff=0.05,
            attempt_timeouts=((TESTSVC, attempt_timeout),),
            idempotent_methods=(TESTSVC,),
        ),
        breaker=BreakerPolicy(enabled=True),
        outlier=OutlierPolicy(base_ejection_time=base_ejection_time),
    )


async def steady_calls(
    stub: pb_grpc.TestServiceStub, label: str, count: int, interval: float, timeout: float
) -> list[str | BaseException]:
    """``count`` Unary calls started ``interval`` apart, each with ``timeout``: the id of the
    replica that answered each one, or its error."""

    async def one(i: int) -> str:
        reply = await stub.Unary(pb.UnaryRequest(key=f"{label}-{i}"), timeout=timeout)
        return reply.server_id

    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(interval)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def calls_while_paused(
    stub: pb_grpc.TestServiceStub,
    paused: CommandProcess,
    label: str,
    count: int,
    interval: float,
    timeout: float,
) -> list[str | BaseException]:
    """``steady_calls`` while ``paused`` is stopped (SIGSTOP), once both replicas answered."""
    await both_in_rotation(stub)
    paused.pause()
    try:
        return await steady_calls(stub, label, count, interval, timeout)
    finally:
        paused.resume()


async def test_a_paused_replica_is_ejected_and_no_call_fails(replica_pair) -> None:
    a = replica_pair[0]  # the replica that hangs
    channel, recorder = recorded_channel(replica_pair, policy(), *default_instrumentation())
    detector = channel.detector
    assert detector is not None
    stub = pb_grpc.TestServiceStub(channel)
    try:
        await both_in_rotation(stub)
        a.pause()
        # 200 calls at a steady 50 per second, each with a 2 s overall deadline.
        results = await steady_calls(stub, "paused", 200, interval=0.02, timeout=2.0)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert set(results) == {"b"}

        # The paused replica was ejected after its consecutive per-attempt timeouts ...
        ejections = [e for e in recorder.outliers if e.ejected]
        assert ejections and ejections[0].replica == f"127.0.0.1:{a.port}"
        assert "timeouts" in ejections[0].reason
        assert detector.replicas[1].state == HEALTHY
        # ... after a handful of attempts reached it (not half of the 200 calls) ...
        timed_out = [e for e in recorder.retries if e.reason.startswith("per-attempt timeout")]
        assert 2 <= len(timed_out) <= 12, [e.reason for e in recorder.retries]
        # ... each of which was retried on the live replica, within the retry budget.
        assert all(e.retry for e in timed_out)
        assert recorder.budget_exhausted == 0
        # New streams start on replicas in rotation too.
        for i in range(4):
            request = pb.StreamRequest(key=f"stream-{i}", count=2)
            servers = {m.server_id async for m in stub.ServerStream(request, timeout=2.0)}
            assert servers == {"b"}
    finally:
        a.resume()

    # SIGCONT: after its ejection time a probe finds it alive and it is back in rotation.
    async def a_answers() -> bool:
        return (await stub.Unary(pb.UnaryRequest(key="back"), timeout=2.0)).server_id == "a"

    await eventually(a_answers, timeout=20, what="the resumed replica back in rotation")
    assert detector.replicas[0].state == HEALTHY
    assert any(not e.ejected for e in recorder.outliers)
    await channel.close()


async def test_calls_in_flight_on_a_replica_that_hangs_are_all_retried_elsewhere(
    replica_pair,
) -> None:
    # 200 calls in 0.5 s with a 1 s attempt timeout: about 100 attempts are in flight on the
    # replica when it hangs, far more than the retry budget's 5 spare tokens. They fail
    # together, their replica is ejected, and each is retried on the live replica. (With a
    # 0.2 s attempt timeout a loaded machine made the live replica's answers time out too: it
    # could not be ejected as well, so those retries were the budget's to refuse.)
    channel, recorder = recorded_channel(
        replica_pair, policy(30.0, attempt_timeout=1.0, timeout=5.0)
    )
    stub = pb_grpc.TestServiceStub(channel)
    results = await calls_while_paused(
        stub, replica_pair[0], "burst", 200, interval=0.0025, timeout=5.0
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    timed_out = [e for e in recorder.retries if e.reason.startswith("per-attempt timeout")]
    assert len(timed_out) > 6  # more than the budget alone would have allowed to retry
    assert all(e.retry for e in timed_out)
    await channel.close()


async def test_with_both_replicas_failing_one_stays_in_rotation(replica_pair) -> None:
    retry = RetryPolicy(max_attempts=1, idempotent_methods=(TESTSVC,))
    # Health checks off: both replicas report SERVING while failing these calls, so a check
    # would re-admit the ejected one (as Envoy does) and the other would be ejected in turn.
    channel, recorder = recorded_channel(
        replica_pair,
        Policy(
            timeout=2.0,
            retry=retry,
            breaker=BreakerPolicy(enabled=False),
            outlier=OutlierPolicy(health_check=False),
        ),
    )
    assert channel.detector is not None
    stub = pb_grpc.TestServiceStub(channel)
    await both_in_rotation(stub)
    broken = pb.Behavior(fail_times=-1, fail_code=UNAVAILABLE)
    for i in range(30):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(pb.UnaryRequest(key=f"bad-{i}", behavior=broken), timeout=2.0)
    states = [r.state for r in channel.detector.replicas]
    assert states.count(EJECTED) == 1
    assert len([e for e in recorder.outliers if e.ejected]) == 1
    # The replica still in rotation answers healthy requests.
    reply = await stub.Unary(pb.UnaryRequest(key="good"), timeout=2.0)
    assert reply.server_id in {"a", "b"}
    await channel.close()


async def test_per_method_attempt_timeout_retries_only_the_matching_method(target: str) -> None:
    channel = aio_channel(
        target,
        Policy(
            timeout=3.0,
            retry=RetryPolicy(
                base_backoff=0.01,
                attempt_timeouts=(("/testsvc.v1.TestService/Unary", 0.2),),
                idempotent_methods=(TESTSVC,),
            ),
            breaker=BreakerPolicy(enabled=False),
        ),
    )
    stub = pb_grpc.TestServiceStub(channel)
    # The first attempt hangs 1 s: the 0.2 s attempt timeout cuts it and the retry succeeds.
    slow_first = pb.Behavior(delay_s=1.0, delay_on_attempts=[1])
    start = time.monotonic()
    reply = await stub.Unary(pb.UnaryRequest(key=f"pm-{time.time()}", behavior=slow_first))
    assert reply.attempt == 2
    assert time.monotonic() - start < 1.0
    await channel.close()


async def test_without_attempt_timeouts_a_paused_replica_costs_only_the_first_few_calls(
    replica_pair,
) -> None:
    # A caller that sets no per-attempt timeout (only the overall deadline): the calls already
    # sent to the paused replica fail at their deadline, but two such timeouts eject it and
    # every later call goes to the live replica (before: every other call until keepalive).
    retry = RetryPolicy(base_backoff=0.01, idempotent_methods=(TESTSVC,))
    channel, recorder = recorded_channel(
        replica_pair,
        Policy(timeout=0.5, retry=retry, outlier=OutlierPolicy(base_ejection_time=30.0)),
    )
    stub = pb_grpc.TestServiceStub(channel)
    results = await calls_while_paused(
        stub, replica_pair[0], "nocap", 100, interval=0.02, timeout=0.5
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(
        isinstance(f, grpc.aio.AioRpcError) and f.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for f in failures
    )
    # Calls started during the first 0.5 s deadline, half of them on the paused replica.
    assert len(failures) <= 20, len(failures)
    assert all(r == "b" for r in results[-50:])
    assert [e.ejected for e in recorder.outliers] == [True]
    await channel.close()


async def test_streams_that_break_on_a_dead_replica_eject_it_for_new_streams(
    replica_pair,
) -> None:
    # Streams alone (no unary calls to learn from): a node reconnecting its control stream
    # after its replica died must stop picking the dead replica after a couple of failures
    # instead of alternating with it until keepalive notices.
    a, b = replica_pair
    channel = aio_channel(addresses(a, b), policy(5.0))
    assert isinstance(channel, ResilientChannel) and channel.detector is not None
    detector = channel.detector
    dead = detector.replicas[0]
    stub = pb_grpc.TestServiceStub(channel)
    try:
        await both_in_rotation(stub)
        a.kill()
        outcomes: list[str] = []
        for i in range(12):
            request = pb.StreamRequest(key=f"reconnect-{i}", count=1)
            try:
                servers = {m.server_id async for m in stub.ServerStream(request, timeout=2.0)}
                outcomes.append(servers.pop())
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                outcomes.append("failed")
                # An ended stream's status reaches the detector from a task on the loop.
                await eventually(
                    lambda: dead.errors >= outcomes.count("failed"),
                    what="the broken stream counted against its replica",
                )
        assert outcomes.count("failed") <= 2, outcomes
        assert outcomes[-6:] == ["b"] * 6, outcomes
        assert dead.state == EJECTED
    finally:
        await channel.close()
