"""Replica failover: a client given two replicas keeps working when one is killed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pkg.clients import aio_channel, sync_channel
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from pkg.testsvc.server import TestServicer as Servicer
from pkg.testsvc.server import build
from tests.clients.conftest import addresses, both_in_rotation, fast_policy, replica_command
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]


async def test_calls_keep_succeeding_when_one_of_two_replicas_is_killed(replica_pair) -> None:
    a, b = replica_pair
    channel = aio_channel(addresses(a, b), fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    await both_in_rotation(stub)

    # Kill a while calls are in flight: none of them may fail.
    async def caller(n: int) -> list[str]:
        ids = []
        for i in range(15):
            reply = await stub.Unary(pb.UnaryRequest(key=f"during-{n}-{i}"), timeout=5)
            ids.append(reply.server_id)
            await asyncio.sleep(0.01)
        return ids

    callers = [asyncio.ensure_future(caller(n)) for n in range(4)]
    await asyncio.sleep(0.05)
    a.kill()
    results = await asyncio.gather(*callers)
    assert sum(len(r) for r in results) == 60

    after = {
        (await stub.Unary(pb.UnaryRequest(key=f"after-{i}"), timeout=5)).server_id
        for i in range(20)
    }
    assert after == {"b"}
    await channel.close()


async def test_no_call_fails_when_a_replica_stops_gracefully_under_load() -> None:
    # A gRPC server that stops cancels the calls reaching it before its callers have seen the
    # GOAWAY (CANCELLED, from the server): an idempotent call retries them on the other replica.
    a, b = build(Servicer("a")), build(Servicer("b"))
    await a.start()
    await b.start()
    channel = aio_channel([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    failures: list[str] = []
    answered: list[str] = []

    async def one(i: int) -> None:
        request = pb.UnaryRequest(key=f"stop-{i}", behavior=pb.Behavior(delay_s=0.01))
        try:
            answered.append((await stub.Unary(request, timeout=5)).server_id)
        except grpc.RpcError as exc:
            failures.append(f"{exc.code().name}: {exc.details()}")

    try:
        await both_in_rotation(stub)
        calls: list[asyncio.Task[None]] = []
        stopping: asyncio.Task[None] | None = None
        for i in range(1500):  # ~1,000 calls a second, the stop starting a third of the way in
            calls.append(asyncio.create_task(one(i)))
            if i == 500:
                stopping = asyncio.create_task(a.stop(2.0))
            await asyncio.sleep(0.001)
        await asyncio.gather(*calls)
        assert stopping is not None
        await stopping
        assert failures == []
        assert len(answered) == 1500 and answered[-1] == "b"
    finally:
        await channel.close()
        await a.stop(0)
        await b.stop(0)


def test_sync_channel_fails_over_too(replica_pair) -> None:
    a, b = replica_pair
    channel = sync_channel(",".join(addresses(a, b)), fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    seen: set[str] = set()
    deadline = time.monotonic() + 15
    while seen != {"a", "b"} and time.monotonic() < deadline:  # both connections up
        seen.add(stub.Unary(pb.UnaryRequest(key="s"), timeout=5).server_id)
    assert seen == {"a", "b"}
    b.kill()
    # Every call succeeds, and all of them on the survivor.
    after = {stub.Unary(pb.UnaryRequest(key=f"t{i}"), timeout=5).server_id for i in range(20)}
    assert after == {"a"}
    channel.close()


async def test_a_restarted_server_is_used_again_within_seconds(process_factory) -> None:
    server = process_factory("testsvc-r", replica_command("r"))
    channel = aio_channel(f"127.0.0.1:{server.port}", fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    assert (await stub.Unary(pb.UnaryRequest(key="up"), timeout=5)).server_id == "r"
    server.kill()
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Unary(pb.UnaryRequest(key="down"), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 2.5  # never past the deadline
    server.start()  # same port

    async def answers_again() -> bool:
        try:
            return (await stub.Unary(pb.UnaryRequest(key="back"), timeout=2)).server_id == "r"
        except grpc.aio.AioRpcError:
            return False

    await eventually(answers_again, timeout=15, interval=0.1, what="the restarted server")
    await channel.close()


async def test_a_channel_over_replicas_reports_a_state_change_it_has_not_seen(
    replica_pair,
) -> None:
    channel = aio_channel(addresses(*replica_pair), fast_policy())
    try:
        await both_in_rotation(pb_grpc.TestServiceStub(channel))  # both connections READY
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # The channel left IDLE before the caller asked, and nothing changes any more: the
        # change already made must be reported at once, not wait for the next one.
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.IDLE), timeout=5
        )
    finally:
        await channel.close()
