""" "Never sent" comes from transport facts the library observed, never from a status text.

A real server answers a method whose contract declares no idempotency (TestService.Charge)
with UNAVAILABLE and exactly the texts a connection failure produces. It ran the call; a client
that took those texts for its own connection failure would run it again. Each must run once.
"""

from __future__ import annotations

import grpc
import pytest

from pkg.clients import (
    BreakerPolicy,
    BudgetPolicy,
    Instrumentation,
    OutlierEvent,
    Policy,
    RetryPolicy,
    Runtime,
    aio_channel,
    sync_channel,
)
from pkg.devstack.servers import CommandProcess, free_port
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import UNAVAILABLE, addresses, attempts, both_in_rotation

# What grpc-core, redis-py and others say when a connection cannot be made: a server that
# relays a downstream failure sends the same words.
CONNECTION_FAILURE_TEXTS = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:5432: "
    "Failed to connect to remote host: Connection refused",
    "connection refused",
    "Error 111 connecting to 10.0.0.7:6379. Connection refused.",
    "DNS resolution failed for db.internal:5432",
    "Socket closed",
    "connections to all backends failing",
)


def _charge(key: str, details: str) -> pb.UnaryRequest:
    return pb.UnaryRequest(
        key=key,
        behavior=pb.Behavior(fail_times=-1, fail_code=UNAVAILABLE, fail_details=details),
    )


def _policy() -> Policy:
    return Policy(
        timeout=5.0,
        retry=RetryPolicy(max_attempts=5, base_backoff=0.01, max_backoff=0.02),
        breaker=BreakerPolicy(enabled=False),
        budget=BudgetPolicy(enabled=False),
    )


@pytest.mark.parametrize("details", CONNECTION_FAILURE_TEXTS)
async def test_a_write_answered_with_connection_failure_text_runs_once(
    target: str, stats_stub: pb_grpc.TestServiceStub, key: str, details: str
) -> None:
    channel = aio_channel(target, _policy())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.TestServiceStub(channel).Charge(_charge(key, details), timeout=5)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == details
    assert (await attempts(stats_stub, key)).attempts == 1


@pytest.mark.parametrize("details", CONNECTION_FAILURE_TEXTS[:3])
async def test_a_blocking_write_answered_with_connection_failure_text_runs_once(
    target: str, stats_stub: pb_grpc.TestServiceStub, key: str, details: str
) -> None:
    channel = sync_channel(target, _policy())
    with pytest.raises(grpc.RpcError):
        pb_grpc.TestServiceStub(channel).Charge(_charge(key, details), timeout=5)
    channel.close()
    assert (await attempts(stats_stub, key)).attempts == 1


async def test_a_write_over_replicas_runs_once_and_ejects_nobody_on_such_text(
    replica_pair: tuple[CommandProcess, CommandProcess], key: str
) -> None:
    ejections: list[OutlierEvent] = []

    class Ejections(Instrumentation):
        def on_outlier(self, event: OutlierEvent) -> None:
            ejections.append(event)

    runtime = Runtime(instrumentation=[Ejections()])
    channel = aio_channel(addresses(*replica_pair), _policy(), runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    await both_in_rotation(stub)
    # Two failures in a row per replica: as connection failures (no answer) they would eject
    # one (consecutive_local_failures=2); as answers from a live replica they do not.
    for n in range(4):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Charge(_charge(f"{key}-{n}", "connection refused"), timeout=5)
    await channel.close()
    ran = []
    for replica in replica_pair:  # attempts are counted per replica process
        alone = aio_channel(f"127.0.0.1:{replica.port}")
        ran.append([(await attempts(pb_grpc.TestServiceStub(alone), f"{key}-{n}")).attempts
                    for n in range(4)])  # fmt: skip
        await alone.close()
    assert [a + b for a, b in zip(*ran, strict=True)] == [1, 1, 1, 1]  # each ran exactly once
    assert ejections == []


async def test_a_write_is_retried_when_the_library_knows_it_never_left(
    replica_pair: tuple[CommandProcess, CommandProcess], key: str
) -> None:
    # One replica address has no server at all: its connection is never READY, so the
    # library does not send the write there and may send it to the other replica.
    live, _ = replica_pair
    dead = f"127.0.0.1:{free_port()}"
    channel = aio_channel([dead, f"127.0.0.1:{live.port}"], _policy())
    stub = pb_grpc.TestServiceStub(channel)
    for n in range(6):
        reply = await stub.Charge(pb.UnaryRequest(key=f"{key}-{n}"), timeout=5)
        assert reply.server_id == "a" and reply.attempt == 1
    await channel.close()
