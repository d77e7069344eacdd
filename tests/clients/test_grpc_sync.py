"""Blocking grpc channels against the real test service (same policy as asyncio)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pkg.clients import BreakerOpenError, BreakerPolicy, RetryPolicy, Runtime, sync_channel
from pkg.clients.breaker import STATE_CLOSED, STATE_OPEN
from pkg.common.clock import FakeClock
from pkg.devstack.servers import free_port
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import (
    CANCELLED,
    INVALID_ARGUMENT,
    NOT_FOUND,
    UNAVAILABLE,
    failing,
    fast_policy,
    retry_until_the_deadline_policy,
)

pytestmark = pytest.mark.integration


def stats(stub: pb_grpc.TestServiceStub, key: str) -> pb.StatsReply:
    return stub.GetStats(pb.StatsRequest(key=key), timeout=5)


def test_unavailable_is_retried_until_success(sync_stub, key) -> None:
    assert sync_stub.Unary(failing(key, 2), timeout=5).attempt == 3
    assert stats(sync_stub, key).attempts == 3


def test_with_call_returns_the_successful_attempts_call(sync_stub, key) -> None:
    reply, call = sync_stub.Unary.with_call(failing(key, 1), timeout=5)
    assert reply.attempt == 2 and call.code() == grpc.StatusCode.OK


def test_cancelled_by_the_server_is_retried(sync_stub, key) -> None:
    reply = sync_stub.Unary(failing(key, 2, CANCELLED), timeout=5)
    assert reply.attempt == 3


@pytest.mark.parametrize("code", [INVALID_ARGUMENT, NOT_FOUND])
def test_domain_errors_are_not_retried(sync_stub, key, code) -> None:
    with pytest.raises(grpc.RpcError) as info:
        sync_stub.Unary(failing(key, 3, code), timeout=5)
    assert info.value.code().value[0] == code
    assert stats(sync_stub, key).attempts == 1


def test_transport_failure_is_retried_then_reported() -> None:
    channel = sync_channel(f"127.0.0.1:{free_port()}", fast_policy())
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.TestServiceStub(channel).Unary(pb.UnaryRequest(key="x"), timeout=2)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 2.5


def test_deadline_is_never_exceeded_and_reaches_the_server(target, key) -> None:
    policy = retry_until_the_deadline_policy()
    channel = sync_channel(target, policy)
    stub = pb_grpc.TestServiceStub(channel)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError):
        stub.Unary(failing(key, -1, delay_s=0.15), timeout=0.8)
    assert time.monotonic() - start < 0.8 + 0.5
    left = list(stats(stub, key).deadlines_left_s)
    assert len(left) >= 2 and all(0 < d <= 0.85 for d in left)
    channel.close()


def test_pushback_is_honoured(sync_stub, key) -> None:
    start = time.monotonic()
    assert sync_stub.Unary(failing(key, 1, pushback_ms=300), timeout=5).attempt == 2
    assert time.monotonic() - start >= 0.3


def test_breaker_opens_and_fails_fast_then_closes(target, sync_stub, key) -> None:
    clock = FakeClock()  # the open duration passes when the test says so
    runtime = Runtime(clock=clock)
    policy = fast_policy(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(min_calls=3, open_duration=0.3),
    )
    channel = sync_channel(target, policy, runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Unary(failing(key, -1), timeout=5)
    assert runtime.breakers[target].state == STATE_OPEN
    with pytest.raises(BreakerOpenError):
        stub.Unary(failing(key, -1), timeout=5)
    assert stats(sync_stub, key).attempts == 3  # the rejected call never left
    clock.advance(0.3)  # open duration over: the next call probes, succeeds and closes it
    assert stub.Unary(pb.UnaryRequest(key=key + "-ok"), timeout=5).attempt == 1
    assert runtime.breakers[target].state == STATE_CLOSED
    channel.close()


def test_threads_are_not_serialised_by_the_breaker(target) -> None:
    channel = sync_channel(target, fast_policy(breaker=BreakerPolicy()))
    stub = pb_grpc.TestServiceStub(channel)
    request = pb.UnaryRequest(key="threads", behavior=pb.Behavior(delay_s=0.2))
    stub.Unary(pb.UnaryRequest(key="warm"), timeout=5)
    threads = [
        threading.Thread(target=stub.Unary, args=(request,), kwargs={"timeout": 10})
        for _ in range(8)
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # pybreaker's own call() would hold its lock for each call: 8 x 0.2 s = 1.6 s.
    assert time.monotonic() - start < 1.6
    channel.close()


def test_server_stream_setup_is_retried(sync_stub, key) -> None:
    request = pb.StreamRequest(
        key=key, count=3, behavior=pb.Behavior(fail_times=1, fail_code=UNAVAILABLE)
    )
    assert [m.seq for m in sync_stub.ServerStream(request, timeout=5)] == [0, 1, 2]
    assert stats(sync_stub, key).attempts == 2


def test_bidi_stream_setup_is_retried_with_replay(sync_stub, key) -> None:
    requests = iter(
        [
            pb.StreamRequest(
                key=key, count=2, behavior=pb.Behavior(fail_times=1, fail_code=UNAVAILABLE)
            )
        ]
    )
    replies = list(sync_stub.BidiStream(requests, timeout=5))
    assert [(m.key, m.attempt) for m in replies] == [(key, 2), (key, 2)]
