"""Replica failover: a client given two replicas keeps working when one is killed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pkg.clients import aio_channel, sync_channel
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import fast_policy, replica_command

pytestmark = [pytest.mark.integration, pytest.mark.failure]


async def test_calls_keep_succeeding_when_one_of_two_replicas_is_killed(process_factory) -> None:
    a = process_factory("testsvc-a", replica_command("a"))
    b = process_factory("testsvc-b", replica_command("b"))
    channel = aio_channel([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], fast_policy())
    stub = pb_grpc.TestServiceStub(channel)
    # Round robin over both replicas once both connections are up (the second one may still be
    # connecting during the first calls).
    seen: set[str] = set()
    deadline = time.monotonic() + 15
    while seen != {"a", "b"} and time.monotonic() < deadline:
        seen.add((await stub.Unary(pb.UnaryRequest(key="before"), timeout=5)).server_id)
        await asyncio.sleep(0.01)
    assert seen == {"a", "b"}

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


def test_sync_channel_fails_over_too(process_factory) -> None:
    a = process_factory("testsvc-a", replica_command("a"))
    b = process_factory("testsvc-b", replica_command("b"))
    channel = sync_channel(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", fast_policy())
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
    deadline = time.monotonic() + 15
    while True:
        try:
            reply = await stub.Unary(pb.UnaryRequest(key="back"), timeout=2)
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "the restarted server was not reconnected"
            await asyncio.sleep(0.1)
    assert reply.server_id == "r"
    await channel.close()
