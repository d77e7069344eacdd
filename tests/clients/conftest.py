"""Fixtures of the pkg.clients tests: a test service process, policies, stubs."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest

from pkg.clients import (
    BreakerPolicy,
    Instrumentation,
    OutlierEvent,
    Policy,
    RetryPolicy,
    aio_channel,
    sync_channel,
)
from pkg.devstack.servers import CommandProcess
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc

TESTSVC = "/testsvc.v1.TestService/*"
UNAVAILABLE = 14
INVALID_ARGUMENT = 3
NOT_FOUND = 5
CANCELLED = 1
DEADLINE_EXCEEDED = 4


def replica_command(server_id: str) -> list[str]:
    """The command line of a test service replica (``{port}`` is filled in by the fixture)."""
    return [sys.executable, "-m", "pkg.testsvc.server", "--port", "{port}", "--id", server_id]


@pytest.fixture(scope="session")
def testsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommandProcess]:
    """One test service process shared by the tests (each test uses its own keys)."""
    proc = CommandProcess(
        "testsvc", replica_command("shared"), run_dir=tmp_path_factory.mktemp("testsvc")
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(timeout=5)


@pytest.fixture
def replica_pair(
    process_factory: Callable[..., CommandProcess],
) -> tuple[CommandProcess, CommandProcess]:
    """Two test service replica processes answering as "a" and "b" (stopped after the test)."""
    return (
        process_factory("testsvc-a", replica_command("a")),
        process_factory("testsvc-b", replica_command("b")),
    )


def addresses(*replicas: CommandProcess) -> list[str]:
    """The loopback addresses of replica processes, for a channel over all of them."""
    return [f"127.0.0.1:{replica.port}" for replica in replicas]


async def both_in_rotation(stub: pb_grpc.TestServiceStub) -> None:
    """Call until replicas "a" and "b" have both answered (the second may still be connecting)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 15
    while seen != {"a", "b"} and time.monotonic() < deadline:
        seen.add((await stub.Unary(pb.UnaryRequest(key="warm"), timeout=5)).server_id)
        await asyncio.sleep(0.01)
    assert seen == {"a", "b"}, f"only {seen} answered within 15 s"


@pytest.fixture
def target(testsvc: CommandProcess) -> str:
    return f"127.0.0.1:{testsvc.port}"


@pytest.fixture
def key() -> str:
    """A fresh attempt-counter key for the test."""
    return f"k-{uuid.uuid4().hex[:12]}"


def fast_policy(**overrides: object) -> Policy:
    """Idempotent testsvc methods, small backoff, breaker off unless asked for."""
    retry = overrides.pop("retry", None) or RetryPolicy(
        max_attempts=4, base_backoff=0.01, max_backoff=0.05, idempotent_methods=(TESTSVC,)
    )
    breaker = overrides.pop("breaker", None) or BreakerPolicy(enabled=False)
    return Policy(retry=retry, breaker=breaker, **overrides)  # type: ignore[arg-type]


def retry_until_the_deadline_policy() -> Policy:
    """Up to 10 attempts with short backoff: only the overall deadline can end the retries."""
    return fast_policy(
        retry=RetryPolicy(
            max_attempts=10, base_backoff=0.05, max_backoff=0.1, idempotent_methods=(TESTSVC,)
        )
    )


@pytest.fixture
async def aio_stub(target: str) -> AsyncIterator[pb_grpc.TestServiceStub]:
    channel = aio_channel(target, fast_policy())
    yield pb_grpc.TestServiceStub(channel)
    await channel.close()


@pytest.fixture
async def stats_stub(target: str) -> AsyncIterator[pb_grpc.TestServiceStub]:
    """A plain-policy stub for reading the server's attempt counters."""
    channel = aio_channel(target, Policy(breaker=BreakerPolicy(enabled=False)))
    yield pb_grpc.TestServiceStub(channel)
    await channel.close()


@pytest.fixture
def sync_stub(target: str) -> Iterator[pb_grpc.TestServiceStub]:
    channel = sync_channel(target, fast_policy())
    yield pb_grpc.TestServiceStub(channel)
    channel.close()


def failing(key: str, times: int, code: int = UNAVAILABLE, **behavior: object) -> pb.UnaryRequest:
    """A Unary request that fails ``times`` times with ``code`` (-1: always)."""
    return pb.UnaryRequest(
        key=key, behavior=pb.Behavior(fail_times=times, fail_code=code, **behavior)
    )


async def attempts(stats_stub: pb_grpc.TestServiceStub, key: str) -> pb.StatsReply:
    return await stats_stub.GetStats(pb.StatsRequest(key=key), timeout=5)


def status_error(code: grpc.StatusCode, details: str) -> grpc.RpcError:
    """An RpcError carrying ``code`` and ``details``, as a scripted attempt raises it."""
    return _StatusError(code, details)


class _StatusError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class Outliers(Instrumentation):
    """Keeps the outlier events of a test with the time each arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, OutlierEvent]] = []

    def on_outlier(self, event: OutlierEvent) -> None:
        self.events.append((time.monotonic(), event))

    def returned(self, replica: str) -> list[tuple[float, OutlierEvent]]:
        """The events that took ``replica`` back into rotation."""
        return [(t, e) for t, e in self.events if e.replica == replica and not e.ejected]
