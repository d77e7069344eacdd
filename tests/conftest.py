"""Fixtures that start real servers on 127.0.0.1 and always stop them (by pid), even on failure.

Session-scoped servers are shared by tests that only read and write namespaced keys. A test that
kills, pauses or restarts a server asks for its own through the ``*_factory`` fixtures.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
# Each xdist worker writes a file of its own beside it (the name + "." + the worker's id).
if os.environ.get("DEV_TEST_STACKS_FILE"):
    _worker = os.environ.get("PYTEST_XDIST_WORKER")
    _path = os.environ["DEV_TEST_STACKS_FILE"] + (f".{_worker}" if _worker else "")
    _stacks = open(_path, "w")  # noqa: SIM115 (open for the session)
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)


# A run stopped with SIGTERM (a CI job cancelled, `timeout`, ./dev test stopped) tears down like
# one stopped with Ctrl-C: every fixture's finalizer runs, so the servers it started stop and the
# network namespaces of tests/hosts are removed. Python's default for SIGTERM is to die at once:
# a SIGTERMed run left four namespaces, the guard route and a redis-server inside one.
def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    with contextlib.suppress(ValueError):  # not the main thread: keep what is there
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminated)
        # A run started in the background of a non-interactive shell inherits SIGINT ignored,
        # and then ./dev test's hang guard (SIGINT to the run) would stop nothing.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# ./dev test runs two pytest-xdist workers with --dist loadscope: each scope runs on one worker,
# its tests one after another. A scope is a test module (its shared fixtures start once), except
# that the tests which must not overlap with each other form one scope: whole platforms on the
# documented ports with their Prometheus (tests/platform, tests/obs) and network namespaces with
# fixed names (tests/hosts). That scope is handed out last, once every other module has been,
# so its drills run with the machine nearly to themselves instead of beside the timing-sensitive
# hand-over and failover tests of the other worker (on CI's 2 cores each side made the other
# miss its bounds now and then: a Signalman hand-over at 9.6 s, a history WAIT over 100 ms, a
# short drill's failover late). (xdist_group marks and
# --dist loadgroup do not work with pytest 9: xdist renames items through an attribute that
# pytest 9 no longer reads.)
EXCLUSIVE = ("tests/platform/", "tests/obs/", "tests/hosts/")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadscope":
        return None  # whatever was asked for instead
    from xdist.scheduler import LoadScopeScheduling

    class Scopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "exclusive" if nodeid.startswith(EXCLUSIVE) else nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node: Any) -> None:
            if "exclusive" in self.workqueue:
                self.workqueue.move_to_end("exclusive")
            super()._assign_work_unit(node)

    return Scopes(config, log)


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
