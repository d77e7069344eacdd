"""One runtime per process by default; explicit runtimes stay apart; the library never prints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from pkg.clients import (
    BreakerOpenError,
    BreakerPolicy,
    Policy,
    RetryPolicy,
    Runtime,
    aio_channel,
    sync_channel,
)
from pkg.clients.runtime import default_runtime
from pkg.devstack.servers import CommandProcess, free_port
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import addresses, both_in_rotation, failing

OPENS_FAST = Policy(
    timeout=2.0,
    retry=RetryPolicy(max_attempts=1),
    breaker=BreakerPolicy(min_calls=4, failure_ratio=0.5, open_duration=30.0),
)


async def test_a_channel_per_request_shares_one_breaker_and_budget_per_target(
    target: str, key: str
) -> None:
    # Code that builds a channel for every call: each one sees the breaker the others opened.
    rejected = 0
    for _ in range(8):
        channel = aio_channel(target, OPENS_FAST)
        try:
            await pb_grpc.TestServiceStub(channel).Unary(failing(key, -1), timeout=2)
        except BreakerOpenError:
            rejected += 1
        except grpc.aio.AioRpcError:
            pass
        finally:
            await channel.close()
    assert rejected >= 3
    runtime = default_runtime()
    assert list(runtime.breakers) == [target]
    assert list(runtime.budgets) == [target]


async def test_an_explicit_runtime_keeps_its_own_protection(target: str, key: str) -> None:
    own = Runtime()
    channel = aio_channel(target, OPENS_FAST, runtime=own)
    stub = pb_grpc.TestServiceStub(channel)
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(failing(key, -1), timeout=2)
    with pytest.raises(BreakerOpenError):
        await stub.Unary(failing(key, -1), timeout=2)
    await channel.close()
    # The process-wide runtime never saw those failures: its breaker lets calls through.
    other = aio_channel(target, OPENS_FAST)
    await pb_grpc.TestServiceStub(other).Unary(failing(key + "-ok", 0), timeout=2)
    await other.close()
    assert own.breakers[target].state == "open"
    assert default_runtime().breakers[target].state == "closed"


def test_blocking_and_asyncio_channels_share_the_process_runtime(target: str) -> None:
    channel = sync_channel(target, OPENS_FAST)
    pb_grpc.TestServiceStub(channel).Echo(pb.EchoRequest(), timeout=2)
    channel.close()
    assert target in default_runtime().breakers


async def test_channels_to_the_same_replicas_share_their_outlier_state(
    replica_pair: tuple[CommandProcess, CommandProcess],
) -> None:
    first = aio_channel(addresses(*replica_pair), Policy())
    second = aio_channel(addresses(*replica_pair), Policy())
    await both_in_rotation(pb_grpc.TestServiceStub(first))
    assert first.detector is second.detector  # type: ignore[attr-defined]
    await first.close()
    await second.close()


_QUIET_CLIENT = textwrap.dedent(
    """
    import asyncio, grpc
    from pkg.clients import BreakerPolicy, Policy, RetryPolicy, aio_channel
    from pkg.proto.testsvc.v1 import testsvc_pb2 as pb, testsvc_pb2_grpc as pb_grpc

    async def main(port):
        policy = Policy(
            timeout=2.0,
            retry=RetryPolicy(max_attempts=3, base_backoff=0.01, max_backoff=0.02),
            breaker=BreakerPolicy(min_calls=2, open_duration=30.0),
        )
        channel = aio_channel(f"127.0.0.1:{port}", policy)
        stub = pb_grpc.TestServiceStub(channel)
        for _ in range(12):  # retries, give-ups, budget refusals, breaker transitions
            try:
                await stub.Unary(pb.UnaryRequest(key="x"), timeout=2)
            except grpc.RpcError:
                pass
        await channel.close()

    asyncio.run(main({port}))
    """
)


def test_the_library_prints_nothing_when_the_application_configured_no_logging() -> None:
    script = _QUIET_CLIENT.format(port=free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == ""
    assert done.stderr == ""


def test_events_go_through_the_applications_logging_when_it_has_some() -> None:
    setup = "import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
    script = setup + _QUIET_CLIENT.format(port=free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pkg.clients" in done.stdout
    assert "breaker_transition" in done.stdout and "give_up" in done.stdout
