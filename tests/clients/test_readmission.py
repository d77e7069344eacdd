"""Active re-admission, panic routing and per-replica breakers against replicas that stop and
come back (real test service processes, killed with SIGKILL and restarted on their port)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pkg.clients import (
    BreakerOpenError,
    BreakerPolicy,
    OutlierPolicy,
    Policy,
    RetryPolicy,
    Runtime,
    aio_channel,
)
from pkg.clients.breaker import STATE_CLOSED, STATE_OPEN
from pkg.clients.grpc_aio import ResilientChannel
from pkg.clients.outlier import EJECTED, HEALTHY
from pkg.devstack.servers import CommandProcess
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import TESTSVC, Outliers, addresses, both_in_rotation
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]


def policy(
    *, breaker: BreakerPolicy | None = None, health_check: bool = True, **outlier: object
) -> Policy:
    return Policy(
        timeout=3.0,
        retry=RetryPolicy(
            max_attempts=3,
            base_backoff=0.01,
            max_backoff=0.05,
            attempt_timeouts=((TESTSVC, 0.5),),
            idempotent_methods=(TESTSVC,),
        ),
        breaker=breaker or BreakerPolicy(enabled=False),
        outlier=OutlierPolicy(
            base_ejection_time=30.0,  # passive probing alone would bench a replica for 30 s
            health_check=health_check,
            health_check_interval=0.3,
            **outlier,  # type: ignore[arg-type]
        ),
    )


def channel_over(
    replicas: tuple[CommandProcess, CommandProcess], p: Policy
) -> tuple[ResilientChannel, pb_grpc.TestServiceStub, Outliers, Runtime]:
    outliers = Outliers()
    runtime = Runtime(instrumentation=[outliers])
    channel = aio_channel(addresses(*replicas), p, runtime=runtime)
    assert isinstance(channel, ResilientChannel) and channel.detector is not None
    return channel, pb_grpc.TestServiceStub(channel), outliers, runtime


async def calls(stub: pb_grpc.TestServiceStub, label: str, count: int) -> list[str]:
    """``count`` calls one after another; the replica that answered each."""
    answered = []
    for i in range(count):
        reply = await stub.Unary(pb.UnaryRequest(key=f"{label}-{i}"), timeout=3.0)
        answered.append(reply.server_id)
    return answered


async def test_a_recovered_replica_is_back_in_rotation_within_a_health_check_interval(
    replica_pair,
) -> None:
    a, _ = replica_pair
    channel, stub, outliers, _ = channel_over(replica_pair, policy())
    detector = channel.detector
    assert detector is not None
    address_a = addresses(a)[0]
    await both_in_rotation(stub)
    a.kill()
    answered = await calls(stub, "a-down", 20)
    assert set(answered) == {"b"}  # every call answered, by the replica that is up
    assert detector.replicas[0].state == EJECTED
    a.start()  # back on its port; its ejection has ~30 s to run
    back = time.monotonic()
    await eventually(lambda: bool(outliers.returned(address_a)), timeout=10.0)
    readmitted_at, event = outliers.returned(address_a)[0]
    assert event.reason == "health check: SERVING"
    # About one interval (0.3 s) plus the check's own round trip, not the 30 s ejection.
    assert readmitted_at - back < 2.0, f"re-admitted {readmitted_at - back:.2f}s after restart"
    assert "a" in set(await calls(stub, "a-back", 10))
    await channel.close()


async def test_panic_routing_tries_an_ejected_replica_when_every_replica_in_rotation_fails(
    replica_pair,
) -> None:
    # Health checks off, so only panic routing can reach the ejected replica that recovered.
    a, b = replica_pair
    channel, stub, _, _ = channel_over(replica_pair, policy(health_check=False))
    detector = channel.detector
    assert detector is not None
    await both_in_rotation(stub)
    a.kill()
    await calls(stub, "a-down", 10)
    assert detector.replicas[0].state == EJECTED
    a.start()  # healthy again (reconnected), but ejected for ~30 s
    assert channel.pool is not None
    to_a = channel.pool.channels[addresses(a)[0]]
    await eventually(lambda: to_a.get_state(True) == grpc.ChannelConnectivity.READY, timeout=10)
    assert detector.replicas[0].state == EJECTED
    b.kill()  # and now the only replica in rotation dies
    answered = await calls(stub, "b-down", 20)
    assert set(answered) == {"a"}  # not one call failed
    assert detector.replicas[0].state == HEALTHY  # its success ended the ejection
    await channel.close()


async def test_a_circuit_breaker_covers_one_replica_not_the_address_list(replica_pair) -> None:
    # Ejection out of the way (it would hide the dead replica from the breaker): 100 failures.
    breaker = BreakerPolicy(min_calls=4, failure_ratio=0.5, window=30.0, open_duration=30.0)
    p = policy(breaker=breaker, consecutive_local_failures=100, consecutive_errors=100)
    a, b = replica_pair
    channel, stub, _, runtime = channel_over(replica_pair, p)
    address_a, address_b = addresses(a, b)
    await both_in_rotation(stub)
    a.kill()
    answered = await calls(stub, "a-down", 30)  # no BreakerOpenError: b answers them all
    assert set(answered) == {"b"}
    assert runtime.breakers[address_a].state == STATE_OPEN
    assert runtime.breakers[address_b].state == STATE_CLOSED
    assert ",".join((address_a, address_b)) not in runtime.breakers  # no service-wide one
    # With the open breaker nothing is sent to a: the calls cost no failed attempt.
    before = runtime.breakers[address_a].rejected
    await calls(stub, "a-open", 5)
    assert runtime.breakers[address_a].rejected > before
    # a comes back: the health check sees it SERVING, the breaker lets a probe through at
    # once (not after its 30 s open duration) and the probe closes it.
    a.start()

    async def a_answers() -> bool:
        return "a" in set(await calls(stub, "a-back", 4))

    deadline = time.monotonic() + 10
    while not await a_answers():
        assert time.monotonic() < deadline, "replica a never came back into rotation"
        await asyncio.sleep(0.1)
    assert runtime.breakers[address_a].state == STATE_CLOSED
    await channel.close()


async def test_every_replica_breaker_open_fails_fast(replica_pair) -> None:
    breaker = BreakerPolicy(min_calls=2, failure_ratio=0.5, window=30.0, open_duration=30.0)
    p = policy(breaker=breaker, health_check=False)
    channel, stub, _, runtime = channel_over(replica_pair, p)
    await both_in_rotation(stub)
    for address in addresses(*replica_pair):
        runtime.breakers[address].force(STATE_OPEN)
    with pytest.raises(BreakerOpenError):
        await stub.Unary(pb.UnaryRequest(key="all-open"), timeout=3.0)
    await channel.close()


async def test_crash_then_restart_then_stop_the_other_fails_no_call(replica_pair) -> None:
    # The issue-19 drill: kill -9 B, B comes back, and as soon as it listens A gets SIGTERM.
    # Passive ejection alone ignored B for its ejection time: a 9.6 s outage.
    a, b = replica_pair
    p = policy(breaker=BreakerPolicy())
    channel, stub, outliers, _ = channel_over(replica_pair, p)
    address_b = addresses(b)[0]
    await both_in_rotation(stub)
    answers: list[tuple[float, str]] = []
    failures: list[BaseException] = []

    async def traffic() -> None:
        i = 0
        while True:
            i += 1
            try:
                reply = await stub.Unary(pb.UnaryRequest(key=f"drill-{i}"), timeout=3.0)
                answers.append((time.monotonic(), reply.server_id))
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(0.02)

    task = asyncio.ensure_future(traffic())
    try:
        b.kill()
        await eventually(
            lambda: any(e.ejected and e.replica == address_b for _, e in outliers.events),
            timeout=10,
            what="b ejected",
        )
        await asyncio.to_thread(b.start)  # listening again, still ejected for ~30 s
        stopped = time.monotonic()
        await asyncio.to_thread(a.stop)  # SIGTERM: graceful stop of the other replica
        await asyncio.sleep(2.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert failures == [], failures[:3]
    after = [who for t, who in answers if t > stopped + 1.0]
    assert after and set(after) == {"b"}
    await channel.close()


async def test_new_streams_skip_a_replica_whose_breaker_is_open(replica_pair) -> None:
    p = policy(breaker=BreakerPolicy(open_duration=30.0), health_check=False)
    channel, stub, _, runtime = channel_over(replica_pair, p)
    address_a, _ = addresses(*replica_pair)
    await both_in_rotation(stub)
    # a's breaker (the one its unary calls use, named by its address) is open: every new
    # stream starts on b, and none fails on a's breaker.
    runtime.breaker(address_a, "", p).force(STATE_OPEN)
    servers = set()
    for i in range(6):
        call = stub.ServerStream(pb.StreamRequest(key=f"s-{i}", count=1), timeout=3.0)
        servers.update([reply.server_id async for reply in call])
    assert servers == {"b"}
    await channel.close()


async def test_the_probe_of_a_dead_replica_does_not_hold_a_call_for_its_deadline(
    replica_pair,
) -> None:
    # No per-attempt cap (a call's one attempt may take its whole deadline), a short ejection
    # and no health checks: once b's ejection is over, calls themselves probe it. Waiting for
    # the connection of a replica still dead held such a call for its 3 s deadline and failed
    # it (DEADLINE_EXCEEDED), while a answered everything else in milliseconds.
    p = Policy(
        timeout=3.0,
        retry=RetryPolicy(base_backoff=0.01, max_backoff=0.05, idempotent_methods=(TESTSVC,)),
        breaker=BreakerPolicy(enabled=False),
        outlier=OutlierPolicy(base_ejection_time=0.2, max_ejection_time=0.2, health_check=False),
    )
    _, b = replica_pair
    channel, stub, outliers, _ = channel_over(replica_pair, p)
    await both_in_rotation(stub)
    b.kill()
    slowest, answered = 0.0, set()
    end = time.monotonic() + 2.5  # about ten ejections of b, each ended by a probe
    i = 0
    while time.monotonic() < end:
        i += 1
        started = time.monotonic()
        reply = await stub.Unary(pb.UnaryRequest(key=f"probe-{i}"), timeout=3.0)
        slowest = max(slowest, time.monotonic() - started)
        answered.add(reply.server_id)
        await asyncio.sleep(0.01)
    assert answered == {"a"}
    ejected = [e for _, e in outliers.events if e.replica == addresses(b)[0] and e.ejected]
    assert len(ejected) >= 3  # b was probed, and ejected again, several times
    assert slowest < 1.0, f"a call took {slowest:.2f} s"
    await channel.close()
