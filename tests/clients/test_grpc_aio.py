"""grpc.aio channels against the real test service over loopback sockets."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

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
    aio_channel,
)
from pkg.clients.breaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN
from pkg.clients.grpc_aio_interceptors import aio_interceptors
from pkg.clients.grpc_core import ClientCore
from pkg.common.clock import FakeClock
from pkg.common.grpcserver import ServiceBinding, build_server
from pkg.devstack.servers import free_port
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from pkg.testsvc.server import TestServicer as Servicer
from tests.clients.conftest import (
    CANCELLED,
    INVALID_ARGUMENT,
    NOT_FOUND,
    TESTSVC,
    UNAVAILABLE,
    attempts,
    failing,
    fast_policy,
    retry_until_the_deadline_policy,
)
from tests.waiting import eventually

pytestmark = pytest.mark.integration


async def test_unavailable_is_retried_until_success(aio_stub, stats_stub, key) -> None:
    reply = await aio_stub.Unary(failing(key, 2), timeout=5)
    assert reply.attempt == 3
    assert (await attempts(stats_stub, key)).attempts == 3


@pytest.mark.parametrize("code", [INVALID_ARGUMENT, NOT_FOUND])
async def test_domain_errors_are_not_retried(aio_stub, stats_stub, key, code) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aio_stub.Unary(failing(key, 3, code), timeout=5)
    assert info.value.code().value[0] == code
    assert (await attempts(stats_stub, key)).attempts == 1


async def test_cancelled_by_the_server_is_retried_on_idempotent_methods_only(
    aio_stub, stats_stub, target, key
) -> None:
    # What a server that is shutting down answers to calls that raced its GOAWAY.
    reply = await aio_stub.Unary(failing(key, 2, CANCELLED), timeout=5)
    assert reply.attempt == 3
    policy = Policy(retry=RetryPolicy(non_idempotent_methods=(TESTSVC,)))
    channel = aio_channel(target, policy)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.TestServiceStub(channel).Unary(failing(f"{key}-w", 1, CANCELLED), timeout=5)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert (await attempts(stats_stub, f"{key}-w")).attempts == 1


async def test_unavailable_on_a_non_idempotent_method_is_not_retried(target, stats_stub, key):
    policy = Policy(retry=RetryPolicy(non_idempotent_methods=(TESTSVC,)))
    channel = aio_channel(target, policy)
    with pytest.raises(grpc.aio.AioRpcError):
        await pb_grpc.TestServiceStub(channel).Unary(failing(key, 1), timeout=5)
    await channel.close()
    assert (await attempts(stats_stub, key)).attempts == 1


async def test_transport_failure_is_retried_even_for_non_idempotent_calls() -> None:
    # Nothing listens yet: the first attempts fail to connect (never sent); then a server
    # appears on that port and a retry reaches it.
    decisions: list[RetryEvent] = []

    class Decisions(Instrumentation):
        def on_retry_decision(self, event: RetryEvent) -> None:
            decisions.append(event)

    port = free_port()
    policy = Policy(
        timeout=10.0,
        retry=RetryPolicy(
            max_attempts=10, base_backoff=0.2, max_backoff=0.5, non_idempotent_methods=(TESTSVC,)
        ),
        breaker=BreakerPolicy(enabled=False),
        budget=BudgetPolicy(enabled=False),
    )
    channel = aio_channel(
        f"127.0.0.1:{port}", policy, runtime=Runtime(instrumentation=[Decisions()])
    )
    stub = pb_grpc.TestServiceStub(channel)
    call = asyncio.ensure_future(stub.Unary(pb.UnaryRequest(key="late"), timeout=10))
    await eventually(lambda: bool(decisions), what="a first attempt refused")
    assert decisions[0].retry and "not sent" in decisions[0].reason
    server = build_server(
        [
            ServiceBinding(
                pb_grpc.add_TestServiceServicer_to_server,
                Servicer("late"),
                "testsvc.v1.TestService",
            )
        ],
        port=port,
    )
    await server.start()
    try:
        reply = await call
        assert reply.server_id == "late" and reply.attempt == 1
    finally:
        await channel.close()
        await server.stop(0)


async def test_transport_failure_to_a_dead_port_is_retried_then_reported() -> None:
    port = free_port()
    events = []

    class Rec(Instrumentation):
        def on_retry_decision(self, event):  # type: ignore[no-untyped-def]
            events.append(event)

    channel = aio_channel(
        f"127.0.0.1:{port}",
        Policy(
            retry=RetryPolicy(base_backoff=0.01, max_backoff=0.02),
            breaker=BreakerPolicy(enabled=False),
        ),
        runtime=Runtime(instrumentation=[Rec()]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        # Charge declares no idempotency: retried only because the library knows it did not
        # send it (no connection was ever READY).
        await pb_grpc.TestServiceStub(channel).Charge(pb.UnaryRequest(key="x"), timeout=3)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [e.retry for e in events] == [True, True, False]
    assert "not sent" in events[0].reason
    assert "attempts exhausted" in events[-1].reason


async def test_deadline_is_never_exceeded_by_retries_and_reaches_the_server(
    target, stats_stub, key
) -> None:
    policy = retry_until_the_deadline_policy()
    channel = aio_channel(target, policy)
    stub = pb_grpc.TestServiceStub(channel)
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Unary(failing(key, -1, delay_s=0.15), timeout=0.8)
    elapsed = time.monotonic() - start
    await channel.close()
    assert elapsed < 0.8 + 0.5  # slack for a loaded machine; no attempt starts after it
    stats = await attempts(stats_stub, key)
    assert 2 <= stats.attempts < 10
    left = list(stats.deadlines_left_s)
    assert all(0 < d <= 0.8 + 0.05 for d in left)
    assert left == sorted(left, reverse=True)  # each attempt sees only what is left


async def test_deadline_is_propagated_to_the_server(aio_stub, key) -> None:
    reply = await aio_stub.Unary(pb.UnaryRequest(key=key), timeout=1.5)
    assert 0 < reply.deadline_left_s <= 1.5 + 0.05  # grpc rounds deadlines up slightly


async def test_per_attempt_timeout_retries_a_slow_attempt(target, stats_stub, key) -> None:
    policy = fast_policy(
        retry=RetryPolicy(
            attempt_timeout=0.3, idempotent_methods=(TESTSVC,), base_backoff=0.01, max_backoff=0.02
        )
    )
    channel = aio_channel(target, policy)
    request = pb.UnaryRequest(key=key, behavior=pb.Behavior(delay_s=2.0, delay_on_attempts=[1]))
    reply = await pb_grpc.TestServiceStub(channel).Unary(request, timeout=5)
    await channel.close()
    assert reply.attempt == 2
    assert 0 < reply.deadline_left_s <= 0.3 + 0.05


async def test_server_pushback_is_honoured(aio_stub, stats_stub, key) -> None:
    start = time.monotonic()
    reply = await aio_stub.Unary(failing(key, 1, pushback_ms=400), timeout=5)
    assert reply.attempt == 2
    assert time.monotonic() - start >= 0.4

    stop_key = key + "-stop"
    with pytest.raises(grpc.aio.AioRpcError):
        await aio_stub.Unary(failing(stop_key, 3, pushback_stop=True), timeout=5)
    assert (await attempts(stats_stub, stop_key)).attempts == 1


async def test_budget_caps_attempts_in_a_total_outage(target, stats_stub, key) -> None:
    policy = fast_policy(budget=BudgetPolicy(max_tokens=10, token_ratio=0.1))
    channel = aio_channel(target, policy)
    stub = pb_grpc.TestServiceStub(channel)
    calls = 40
    for _ in range(calls):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(failing(key, -1), timeout=5)
    await channel.close()
    sent = (await attempts(stats_stub, key)).attempts
    assert sent <= calls + 5  # a naive 4-attempt retry would send 160


async def test_breaker_opens_fails_fast_probes_once_and_closes(target, stats_stub, key) -> None:
    clock = FakeClock()  # the open duration passes when the test says so
    runtime = Runtime(clock=clock)
    policy = fast_policy(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(min_calls=4, failure_ratio=0.5, open_duration=0.5),
    )
    channel = aio_channel(target, policy, runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(failing(key, -1), timeout=5)
    breaker = runtime.breakers[target]
    assert breaker.state == STATE_OPEN
    with pytest.raises(BreakerOpenError) as info:
        await stub.Unary(failing(key, -1), timeout=5)
    assert info.value.retry_after == pytest.approx(0.5)
    assert (await attempts(stats_stub, key)).attempts == 4  # the rejected call never left

    clock.advance(0.5)  # open duration over: the next call is the single probe
    slow_ok = pb.UnaryRequest(key=key + "-probe", behavior=pb.Behavior(delay_s=1.0))
    probe = asyncio.ensure_future(stub.Unary(slow_ok, timeout=5))
    await eventually(lambda: breaker.state == STATE_HALF_OPEN, what="the probe admitted")
    with pytest.raises(BreakerOpenError):  # one probe only, while it is in flight
        await stub.Unary(pb.UnaryRequest(key=key + "-other"), timeout=5)
    await probe
    assert breaker.state == STATE_CLOSED
    assert (await stub.Unary(pb.UnaryRequest(key=key + "-after"), timeout=5)).attempt == 1
    await channel.close()


async def test_cancelled_probe_does_not_strand_the_breaker(target, key) -> None:
    runtime = Runtime()
    channel = aio_channel(
        target, fast_policy(breaker=BreakerPolicy(open_duration=0.2)), runtime=runtime
    )
    stub = pb_grpc.TestServiceStub(channel)
    await stub.Unary(pb.UnaryRequest(key=key), timeout=5)
    breaker = runtime.breakers[target]
    breaker.force(STATE_OPEN, open_for=0.0)
    probe = asyncio.ensure_future(
        stub.Unary(pb.UnaryRequest(key=key, behavior=pb.Behavior(delay_s=5.0)), timeout=10)
    )
    await eventually(lambda: breaker.state == STATE_HALF_OPEN, what="the probe admitted")
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    reply = await stub.Unary(pb.UnaryRequest(key=key + "-next"), timeout=5)
    assert reply.attempt == 1
    assert breaker.state == STATE_CLOSED
    await channel.close()


async def test_hedging_sends_a_second_attempt_and_cancels_the_loser(
    target, stats_stub, key
) -> None:
    policy = fast_policy(hedge=HedgePolicy(enabled=True, delay=0.1))
    channel = aio_channel(target, policy)
    request = pb.UnaryRequest(key=key, behavior=pb.Behavior(delay_s=3.0, delay_on_attempts=[1]))
    start = time.monotonic()
    reply = await pb_grpc.TestServiceStub(channel).Unary(request, timeout=5)
    assert reply.attempt == 2
    assert time.monotonic() - start < 2.0

    async def loser_cancelled() -> bool:
        return (await attempts(stats_stub, key)).cancelled == 1

    await eventually(loser_cancelled, timeout=10, what="the server seeing the loser cancelled")
    stats = await attempts(stats_stub, key)
    assert stats.attempts == 2 and stats.cancelled == 1 and stats.completed == 1
    await channel.close()


async def test_64_concurrent_calls_through_one_breaker_are_not_serialised(target) -> None:
    runtime = Runtime()
    channel = aio_channel(target, fast_policy(breaker=BreakerPolicy()), runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    await stub.Unary(pb.UnaryRequest(key="warm"), timeout=5)
    request = pb.UnaryRequest(key="concurrent", behavior=pb.Behavior(delay_s=0.25))
    start = time.monotonic()
    replies = await asyncio.gather(*(stub.Unary(request, timeout=20) for _ in range(64)))
    elapsed = time.monotonic() - start
    await channel.close()
    assert len(replies) == 64 and len(runtime.breakers) == 1
    # Serialised behind one breaker this would take 64 x 0.25 s = 16 s.
    assert elapsed < 16 / 4


async def test_token_is_sent_as_a_bearer_header(key) -> None:
    class AuthEcho(Servicer):
        async def Echo(self, request, context):  # type: ignore[no-untyped-def]
            metadata = dict(context.invocation_metadata())
            return pb.EchoReply(payload=metadata.get("authorization", "").encode())

    server = build_server(
        [
            ServiceBinding(
                pb_grpc.add_TestServiceServicer_to_server, AuthEcho(), "testsvc.v1.TestService"
            )
        ],
        port=0,
    )
    await server.start()
    channel = aio_channel(f"127.0.0.1:{server.port}", token="s3cret")
    reply = await pb_grpc.TestServiceStub(channel).Echo(pb.EchoRequest(), timeout=5)
    await channel.close()
    await server.stop(0)
    assert reply.payload == b"Bearer s3cret"


async def test_server_stream_setup_is_retried(aio_stub, stats_stub, key) -> None:
    request = pb.StreamRequest(
        key=key, count=3, behavior=pb.Behavior(fail_times=2, fail_code=UNAVAILABLE)
    )
    seqs = [m.seq async for m in aio_stub.ServerStream(request, timeout=5)]
    assert seqs == [0, 1, 2]
    assert (await attempts(stats_stub, key)).attempts == 3


async def test_stream_is_never_retried_after_data_flowed(key) -> None:
    class BreaksMidStream(Servicer):
        async def ServerStream(self, request, context):  # type: ignore[no-untyped-def]
            self.stats[request.key].attempts += 1
            yield pb.StreamReply(key=request.key, seq=0)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-stream")

    servicer = BreaksMidStream()
    server = build_server(
        [
            ServiceBinding(
                pb_grpc.add_TestServiceServicer_to_server, servicer, "testsvc.v1.TestService"
            )
        ],
        port=0,
    )
    await server.start()
    channel = aio_channel(f"127.0.0.1:{server.port}", fast_policy())
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in pb_grpc.TestServiceStub(channel).ServerStream(
            pb.StreamRequest(key=key, count=5), timeout=5
        ):
            received.append(message.seq)
    await channel.close()
    await server.stop(0)
    assert received == [0]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.stats[key].attempts == 1


async def test_bidi_stream_setup_is_retried_replaying_the_first_requests(
    aio_stub, stats_stub, key
) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamRequest(
            key=key, count=2, behavior=pb.Behavior(fail_times=1, fail_code=UNAVAILABLE)
        )

    replies = [m async for m in aio_stub.BidiStream(requests(), timeout=5)]
    assert [(m.key, m.attempt) for m in replies] == [(key, 2), (key, 2)]
    assert (await attempts(stats_stub, key)).attempts == 2


async def test_streams_without_a_timeout_get_no_deadline(aio_stub, key) -> None:
    # A long-lived subscription must not be cut by the policy's unary timeout.
    request = pb.StreamRequest(key=key, count=2, interval_s=0.05)
    seqs = [m.seq async for m in aio_stub.ServerStream(request)]
    assert seqs == [0, 1]


async def test_unary_call_object_exposes_the_last_attempts_status(target, key) -> None:
    channel = aio_channel(target, fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    call = stub.Unary(failing(key, 1), timeout=5)
    assert not call.done()
    reply = await call
    assert reply.attempt == 2 and call.done()
    assert await call.code() == grpc.StatusCode.OK
    assert (await call) is reply  # awaiting again returns the same outcome
    failed = stub.Unary(failing(key + "-nf", 1, NOT_FOUND), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await failed
    assert await failed.code() == grpc.StatusCode.NOT_FOUND
    assert "scripted failure" in await failed.details()
    await channel.close()


async def test_asking_a_call_in_flight_for_its_status_does_not_send_it_again(
    target, stats_stub, key
) -> None:
    channel = aio_channel(target, fast_policy())
    call = pb_grpc.TestServiceStub(channel).Unary(failing(key, 1, delay_s=0.2), timeout=5)
    running = asyncio.ensure_future(call)
    done: list[bool] = []
    call.add_done_callback(lambda finished: done.append(finished.done()))
    assert await call.code() == grpc.StatusCode.OK  # waits for the call the task runs
    assert (await running).attempt == 2
    await channel.close()
    assert done == [True]  # once, when every attempt was over
    assert (await attempts(stats_stub, key)).attempts == 2  # one failure, one retry: no copy


async def test_cancel_stops_a_call_waiting_to_retry(target, stats_stub, key) -> None:
    channel = aio_channel(target, fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    call = stub.Unary(failing(key, 1, pushback_ms=30_000), timeout=60)  # retry in 30 s
    running = asyncio.ensure_future(call)

    async def first_attempt_failed() -> bool:
        return (await attempts(stats_stub, key)).attempts == 1

    await eventually(first_attempt_failed, what="the first attempt refused")
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, timeout=10)
    assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED
    assert not call.cancel()  # already over

    never_started = stub.Unary(pb.UnaryRequest(key=key + "-never"), timeout=5)
    assert never_started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await never_started
    await channel.close()
    assert (await attempts(stats_stub, key)).attempts == 1
    assert (await attempts(stats_stub, key + "-never")).attempts == 0


@pytest.mark.parametrize("hedged", [False, True])
async def test_cancel_stops_the_attempts_in_flight(target, stats_stub, key, hedged) -> None:
    policy = fast_policy(hedge=HedgePolicy(enabled=hedged, delay=0.05))
    channel = aio_channel(target, policy)
    slow = pb.UnaryRequest(key=key, behavior=pb.Behavior(delay_s=30.0))
    call = pb_grpc.TestServiceStub(channel).Unary(slow, timeout=60)
    running = asyncio.ensure_future(call)
    sent = 2 if hedged else 1

    async def all_sent() -> bool:
        return (await attempts(stats_stub, key)).attempts == sent

    await eventually(all_sent, what=f"{sent} attempt(s) on the server")
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, timeout=10)

    async def all_cancelled() -> bool:
        return (await attempts(stats_stub, key)).cancelled == sent

    await eventually(all_cancelled, what="the server seeing every attempt cancelled")
    await channel.close()


async def test_the_unary_interceptor_also_works_on_a_plain_grpc_channel(target, key) -> None:
    # aio_channel runs unary calls without grpc's interceptor task (it is faster); the
    # interceptor class gives the same policy to a channel built by grpc itself.
    core = ClientCore(fast_policy(), Runtime(), target, "tok")
    channel = grpc.aio.insecure_channel(target, interceptors=aio_interceptors(core))
    reply = await pb_grpc.TestServiceStub(channel).Unary(failing(key, 2), timeout=5)
    await channel.close()
    assert reply.attempt == 3


async def test_a_stream_written_with_write_is_not_held_back_by_the_setup_window(target, key):
    # grpc.aio feeds call.write() through a proxy iterator that starts only once the
    # interceptors return: waiting there for a first response (the setup window of replayable
    # streams) would hold the first write back for the whole window.
    channel = aio_channel(target, fast_policy(stream_setup=60.0))
    call = pb_grpc.TestServiceStub(channel).BidiStream(timeout=30)
    try:
        await asyncio.wait_for(call.write(pb.StreamRequest(key=key, count=1)), timeout=20)
        assert (await asyncio.wait_for(call.read(), timeout=20)).key == key
        await call.done_writing()
    finally:
        await channel.close()


async def test_a_stream_written_with_write_fails_fast_on_an_open_breaker(
    target, stats_stub, key
) -> None:
    # call.write() streams cannot be replayed, so they get no retries; an open breaker still
    # keeps them off the callee, and the rejection is reported like any other.
    rejected: list[str] = []

    class Rejections(Instrumentation):
        def on_breaker_rejected(self, name: str, retry_after: float) -> None:
            rejected.append(name)

    runtime = Runtime(instrumentation=[Rejections()])
    channel = aio_channel(target, fast_policy(breaker=BreakerPolicy()), runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    call = stub.BidiStream(timeout=5)
    await call.write(pb.StreamRequest(key=key, count=1))
    assert (await call.read()).attempt == 1
    await call.done_writing()

    runtime.breakers[target].force(STATE_OPEN, open_for=60)
    refused = stub.BidiStream(timeout=5)
    with pytest.raises(BreakerOpenError):
        await refused.read()
    await channel.close()
    assert rejected == [target]
    assert (await attempts(stats_stub, key)).attempts == 1  # the refused stream never left


async def test_a_server_that_answers_slowly_opens_the_slow_call_breaker(target: str, key: str):  # type: ignore[no-untyped-def]
    policy = fast_policy(breaker=BreakerPolicy(min_calls=3, slow_call_duration=0.05))
    channel = aio_channel(target, policy, runtime=Runtime())
    stub = pb_grpc.TestServiceStub(channel)
    slow = pb.UnaryRequest(key=key, behavior=pb.Behavior(delay_s=0.1))
    for _ in range(3):
        assert (await stub.Unary(slow, timeout=5)).key == key  # every call succeeds, slowly
    with pytest.raises(BreakerOpenError):
        await stub.Unary(slow, timeout=5)
    await channel.close()
