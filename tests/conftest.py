"""Fixtures that start real servers on 127.0.0.1 and always stop them (by pid), even on failure.

Session-scoped servers are shared by tests that only read and write namespaced keys. A test that
kills, pauses or restarts a server asks for its own through the ``*_factory`` fixtures.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# A child Python has to fork rather than vfork (initdb switches to the postgres user in Python)
# runs gRPC's fork handlers, which can crash it before it execs while channels are busy in
# other threads (seen: postgres "exited with -11"). The tests only fork to exec, so they need no
# fork support. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest

from pkg.devstack.servers import (
    CommandProcess,
    KafkaBroker,
    PostgresServer,
    RedisServer,
    ServerProcess,
    remove_run_dir,
)

# `./dev test` sends SIGUSR1 before it stops a run that outlived its wall-clock bound: every
# thread's stack goes to the file it names (stderr is captured by pytest), so a hang says where.
if os.environ.get("DEV_TEST_STACKS_FILE"):
    _stacks = open(os.environ["DEV_TEST_STACKS_FILE"], "w")  # noqa: SIM115 (open for the session)
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)


@pytest.fixture(autouse=True)
def _fresh_client_runtime() -> Iterator[None]:
    """Each test starts with an empty process-wide pkg.clients runtime: one test's open breaker
    or spent retry budget for a target never reaches the next test."""
    from pkg.clients.runtime import fresh_runtime

    with fresh_runtime():
        yield


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


def _factory(run_root: Path, cls: type[ServerProcess]) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def make(**kwargs: object) -> ServerProcess:
        server = cls(run_dir=run_root / f"{cls.name}-{len(started)}-{id(kwargs)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(started):
            server.stop()
            remove_run_dir(server)


@pytest.fixture
def redis_factory(run_root: Path) -> Iterator[Callable[..., ServerProcess]]:
    yield from _factory(run_root, RedisServer)


@pytest.fixture
def postgres_factory(run_root: Path) -> Iterator[Callable[..., ServerProcess]]:
    yield from _factory(run_root, PostgresServer)


@pytest.fixture
def kafka_factory(run_root: Path) -> Iterator[Callable[..., ServerProcess]]:
    yield from _factory(run_root, KafkaBroker)


def _session_server(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
        remove_run_dir(server)


@pytest.fixture(scope="session")
def redis_server(run_root: Path) -> Iterator[ServerProcess]:
    yield from _session_server(RedisServer(run_dir=run_root / "redis-session"))


@pytest.fixture(scope="session")
def postgres_server(run_root: Path) -> Iterator[ServerProcess]:
    yield from _session_server(PostgresServer(run_dir=run_root / "postgres-session"))


@pytest.fixture(scope="session")
def kafka_broker(run_root: Path) -> Iterator[ServerProcess]:
    yield from _session_server(KafkaBroker(run_dir=run_root / "tansu-session"))


@pytest.fixture
def process_factory(tmp_path: Path) -> Iterator[Callable[..., CommandProcess]]:
    """Start commands (service replicas) as process groups; all are stopped after the test."""
    started: list[CommandProcess] = []

    def make(name: str, command: list[str], **kwargs: object) -> CommandProcess:
        proc = CommandProcess(name, command, run_dir=tmp_path / f"{name}-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in reversed(started):
            proc.stop(timeout=5)


PYTHON = sys.executable
