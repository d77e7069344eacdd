"""Real server processes on 127.0.0.1: Redis, PostgreSQL and the Kafka-compatible broker tansu.

Used by ``./dev up`` and by the test fixtures. Each server runs in its own process group under a
run directory; it is stopped, killed, paused (SIGSTOP) and resumed by its own pid/pgid, never by
name. ``restart()`` brings it back on the same port, which is what failure drills need.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pkg.devstack import install


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ServerError(RuntimeError):
    """A server did not start or stop as asked; the message carries the tail of its log."""


class ServerProcess:
    """One server process in its own process group, with its log under ``run_dir``."""

    name = "server"
    ready_timeout = 20.0

    def __init__(self, run_dir: Path | None = None, port: int | None = None) -> None:
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.run_dir / f"{self.name}.log"
        self.restarts = 0

    # -- subclass hooks -------------------------------------------------------------------
    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare(self) -> None:
        """One-time setup before the first start (data directories)."""

    def is_ready(self) -> bool:
        return port_open(self.port)

    def cleanup(self) -> None:
        """Remove data kept outside ``run_dir`` (after ``stop``)."""

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> None:
        if self.running:
            return
        if self.proc is None and self.restarts == 0:
            self.prepare()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                list(self.command()),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self.popen_kwargs(),
            )
        finally:
            log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.05)
        raise ServerError(f"{self.name} not ready on port {self.port}:\n{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM to the group, SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """Crash it: SIGKILL to the whole group, no chance to clean up."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def restart(self, wait: bool = True) -> None:
        self.stop()
        self.restarts += 1
        self.start(wait=wait)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(ServerProcess):
    """``redis-server`` with no persistence: a restart starts empty, like a lost cache node."""

    name = "redis"

    def command(self) -> Sequence[str]:
        return [
            str(install.redis_server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.run_dir),
            "--loglevel", "warning",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class PostgresServer(ServerProcess):
    """PostgreSQL 15 in a throw-away data directory, run as the ``postgres`` user when root."""

    name = "postgres"
    ready_timeout = 30.0

    def __init__(self, run_dir: Path | None = None, port: int | None = None) -> None:
        super().__init__(run_dir=run_dir, port=port)
        # The postgres user must reach its data and socket directories; test and run dirs are
        # often private to root (0700), so the cluster lives in its own world-traversable dir.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.pg_dir.chmod(0o755)

    def _as_postgres(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    @property
    def data_dir(self) -> Path:
        return self.pg_dir / "data"

    def prepare(self) -> None:
        bin_dir = install.postgres_bin_dir()
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        kwargs = self._as_postgres()
        if kwargs:
            for path in (self.pg_dir, self.data_dir):
                os.chown(path, kwargs["user"], kwargs["group"])
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.pg_dir,
            **kwargs,
        )  # fmt: skip

    def command(self) -> Sequence[str]:
        # As root, ``setpriv`` switches to the postgres user after the exec. Switching in Python
        # (Popen's user=) makes it fork instead of vfork, and gRPC's fork handlers, run in that
        # child while a caller's channels are busy, can crash it before it execs (seen: postgres
        # "exited with -11" when a test or drill restarted it).
        as_postgres: list[str] = []
        if os.geteuid() == 0:
            as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]
            as_postgres.append("--")
        return [
            *as_postgres,
            str(install.postgres_bin_dir() / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.pg_dir),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def popen_kwargs(self) -> dict[str, Any]:
        return {"cwd": self.pg_dir}

    def cleanup(self) -> None:
        """Remove the cluster's data directory (after ``stop``)."""
        shutil.rmtree(self.pg_dir, ignore_errors=True)

    def is_ready(self) -> bool:
        if not port_open(self.port):
            return False
        result = subprocess.run(
            [str(install.postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1",
             "-p", str(self.port), "-U", "postgres", "-q"],
            check=False,
        )  # fmt: skip
        return result.returncode == 0

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


class KafkaBroker(ServerProcess):
    """The Kafka-compatible broker ``tansu`` with in-memory storage (a restart loses topics)."""

    name = "tansu"

    def command(self) -> Sequence[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(install.tansu_binary()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def remove_run_dir(server: ServerProcess) -> None:
    server.cleanup()
    shutil.rmtree(server.run_dir, ignore_errors=True)


class CommandProcess(ServerProcess):
    """Any command (a service replica, the test service) ready when ``ready_port`` accepts TCP.

    ``env`` is added to the current environment; ``{port}`` in the command is replaced by the
    allocated port.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        run_dir: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_port: int | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.ready_timeout = ready_timeout
        super().__init__(run_dir=run_dir, port=port)
        self._command = [part.replace("{port}", str(self.port)) for part in command]
        self._env = env or {}
        self.ready_port = ready_port or self.port

    def command(self) -> Sequence[str]:
        return self._command

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": {**os.environ, "PYTHONUNBUFFERED": "1", **self._env}}

    def is_ready(self) -> bool:
        return port_open(self.ready_port)
