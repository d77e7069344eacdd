"""Real server processes: Redis, PostgreSQL and the Kafka-compatible broker tansu.

Used by ``./dev up`` and by the test fixtures. Each server runs in its own process group under a
run directory; it is stopped, killed, paused (SIGSTOP) and resumed by its own pid/pgid, never by
name. ``restart()`` brings it back on the same port, which is what failure drills need.

A server listens on ``host`` (127.0.0.1 unless told otherwise) and, given ``exec_prefix`` (e.g.
``nsenter --net=/run/netns/NAME --``, see ``devtools.hosts``), runs inside another network
namespace: it then binds and advertises that host's address.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pkg.devstack import install
from pkg.devstack.certs import CertFiles


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

    def __init__(
        self,
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        exec_prefix: Sequence[str] = (),
        tls: CertFiles | None = None,
    ) -> None:
        # TLS (and client certificates) for servers that support it: Redis, PostgreSQL.
        self.tls = tls
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.exec_prefix = list(exec_prefix)
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
        return port_open(self.port, self.host)

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
                [*self.exec_prefix, *self.command()],
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
        listen = [arg for key, value in redis_listen(self.port, self.tls)
                  for arg in (f"--{key}", value)]  # fmt: skip
        return [
            str(install.redis_server_binary()),
            *listen,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.run_dir),
            "--loglevel", "warning",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """The client URL: ``rediss://`` with the CA and this process's client certificate in
        the query string (redis-py's SSL options) when the server runs TLS."""
        if self.tls is None:
            return f"redis://{self.host}:{self.port}/0"
        return (
            f"rediss://{self.host}:{self.port}/0?ssl_ca_certs={self.tls.ca}"
            f"&ssl_certfile={self.tls.cert}&ssl_keyfile={self.tls.key}"
        )

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw:
                sock: socket.socket = raw
                if self.tls is not None:
                    sock = _tls_client(self.tls).wrap_socket(raw, server_hostname=self.host)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def redis_listen(port: int, tls: CertFiles | None) -> list[tuple[str, str]]:
    """Where a redis-server or a Sentinel listens (its config directives). With TLS the port
    speaks TLS only (no plaintext port), clients need a certificate issued by the CA, and
    ``tls-replication`` makes it speak TLS to what it connects to as well: a replica to its
    primary, a Sentinel to the servers it monitors and to the other Sentinels."""
    if tls is None:
        return [("port", str(port))]
    return [
        ("port", "0"),
        ("tls-port", str(port)),
        ("tls-cert-file", str(tls.cert)),
        ("tls-key-file", str(tls.key)),
        ("tls-ca-cert-file", str(tls.ca)),
        ("tls-auth-clients", "yes"),
        ("tls-replication", "yes"),
    ]


def _tls_client(files: CertFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


class RedisReplicaServer(RedisServer):
    """A Redis started as a replica of ``primary`` (``--replicaof``), no persistence.

    ``min_replicas_to_write`` applies when it is (or becomes) a primary: with 1, a primary that
    lost its replicas (a paused "zombie" woken after a failover) refuses writes once the link
    ages past ``min_replicas_max_lag`` seconds.
    """

    name = "redis-replica"

    def __init__(
        self,
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        primary: tuple[str, int] | None = None,
        min_replicas_to_write: int = 0,
        min_replicas_max_lag: int = 10,
        tls: CertFiles | None = None,
    ) -> None:
        # With TLS it replicates over TLS too (``--tls-replication``, see RedisServer).
        super().__init__(run_dir=run_dir, port=port, tls=tls)
        self.primary = primary
        self.min_replicas_to_write = min_replicas_to_write
        self.min_replicas_max_lag = min_replicas_max_lag

    def command(self) -> Sequence[str]:
        cmd = [*super().command()]
        if self.primary is not None:
            cmd += ["--replicaof", self.primary[0], str(self.primary[1])]
        if self.min_replicas_to_write:
            cmd += [
                "--min-replicas-to-write", str(self.min_replicas_to_write),
                "--min-replicas-max-lag", str(self.min_replicas_max_lag),
            ]  # fmt: skip
        # Sentinel reconfigures replicas with REPLICAOF; a restarted replica must accept it.
        cmd += ["--replica-read-only", "yes"]
        return cmd


class SentinelServer(ServerProcess):
    """``redis-server --sentinel`` watching one primary under ``master_name``.

    Sentinel rewrites its config file (failovers, known replicas and Sentinels), so the file
    lives in the run directory and a restart keeps what it learnt.

    With ``tls`` its port speaks TLS only and asks clients for a certificate issued by the CA,
    and ``tls-replication yes`` makes it talk TLS to everything it connects to: the Redis
    servers it monitors (presenting its certificate as client certificate) and the other
    Sentinels, to which it announces its TLS port.
    """

    name = "sentinel"

    def __init__(
        self,
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        primary: tuple[str, int],
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        tls: CertFiles | None = None,
    ) -> None:
        super().__init__(run_dir=run_dir, port=port, tls=tls)
        self.primary = primary
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_path = self.run_dir / "sentinel.conf"

    def prepare(self) -> None:
        host, port = self.primary
        m = self.master_name
        listen = "".join(f"{key} {value}\n" for key, value in redis_listen(self.port, self.tls))
        self.config_path.write_text(
            listen + "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {self.run_dir}\n"
            f"sentinel monitor {m} {host} {port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {m} {self.down_after_ms}\n"
            f"sentinel failover-timeout {m} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {m} 2\n"
        )

    def command(self) -> Sequence[str]:
        return [
            str(install.redis_server_binary()), str(self.config_path), "--sentinel",
            "--loglevel", "notice",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        try:
            return redis_command(self.port, "PING", timeout=0.5, tls=self.tls).startswith("+PONG")
        except OSError:
            return False


def redis_command(port: int, *args: str, timeout: float = 2.0, tls: CertFiles | None = None) -> str:
    """One command to a Redis or Sentinel on 127.0.0.1, its reply as text; over TLS with
    ``tls``'s CA and client certificate when given.

    For devstack status and drills, which must not depend on an event loop or a client pool.
    """
    with contextlib.ExitStack() as closing:
        sock = closing.enter_context(socket.create_connection(("127.0.0.1", port), timeout))
        if tls is not None:
            sock = closing.enter_context(
                _tls_client(tls).wrap_socket(sock, server_hostname="127.0.0.1")
            )
        parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
        sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
        sock.settimeout(timeout)
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk or _resp_complete(data):
                break
    return data.decode(errors="replace")


def _resp_complete(data: bytes) -> bool:
    try:
        _, end = _resp_parse(data, 0)
    except (IndexError, ValueError):
        return False
    return end == len(data)


def _resp_parse(data: bytes, i: int) -> tuple[Any, int]:
    kind, line_end = data[i : i + 1], data.index(b"\r\n", i)
    head = data[i + 1 : line_end]
    if kind in (b"+", b"-", b":"):
        return head.decode(), line_end + 2
    if kind == b"$":
        n = int(head)
        if n < 0:
            return None, line_end + 2
        if len(data) < line_end + 2 + n + 2:
            raise IndexError("incomplete")
        return data[line_end + 2 : line_end + 2 + n].decode(), line_end + 4 + n
    if kind == b"*":
        n, out, j = int(head), [], line_end + 2
        for _ in range(max(n, 0)):
            item, j = _resp_parse(data, j)
            out.append(item)
        return out, j
    raise ValueError(f"unexpected RESP type {kind!r}")


def redis_info(
    port: int, section: str = "replication", tls: CertFiles | None = None
) -> dict[str, str]:
    """``INFO <section>`` of the Redis on ``port`` as a dict."""
    text = redis_command(port, "INFO", section, tls=tls)
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class RedisHA:
    """A Sentinel-managed Redis on 127.0.0.1: one primary, ``replicas`` replicas and
    ``sentinels`` Sentinels (quorum: a majority), no persistence.

    ``spec`` is the ``redis+sentinel://`` spec clients use. Servers are exposed (``servers``,
    ``sentinel_servers``) so drills can kill, pause and restart each one by pid; ``primary_port``
    asks the Sentinels who is primary now.

    ``tls`` (a certificate per process name: ``redis-0``, ``sentinel-1``, ``redis-clients``)
    runs every hop over TLS with client certificates required: clients to the Sentinels and to
    the primary, replicas to the primary, Sentinels to the servers and to each other. ``spec``
    is then ``rediss+sentinel://`` with the CA and the ``redis-clients`` certificate, and
    ``command``/``info`` (what drills and the status view use) speak TLS as well.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        min_replicas_to_write: int = 1,
        min_replicas_max_lag: int = 2,
        tls: Callable[[str], CertFiles] | None = None,
    ) -> None:
        self.master_name = master_name
        port = free_port()
        common: dict[str, Any] = {
            "min_replicas_to_write": min_replicas_to_write if replicas else 0,
            "min_replicas_max_lag": min_replicas_max_lag,
        }

        def cert(name: str) -> dict[str, Any]:
            return {"tls": tls(name)} if tls is not None else {}

        # What the clients present: the spec's certificate, the drills' and status commands'.
        self.client_tls = tls("redis-clients") if tls is not None else None
        self.servers: list[RedisReplicaServer] = [
            RedisReplicaServer(run_dir / "redis-0", port, **common, **cert("redis-0"))
        ]
        for i in range(replicas):
            self.servers.append(
                RedisReplicaServer(
                    run_dir / f"redis-{i + 1}",
                    primary=("127.0.0.1", port),
                    **common,
                    **cert(f"redis-{i + 1}"),
                )
            )
        self.sentinel_servers = [
            SentinelServer(
                run_dir / f"sentinel-{i}",
                primary=("127.0.0.1", port),
                master_name=master_name,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                **cert(f"sentinel-{i}"),
            )
            for i in range(sentinels)
        ]

    @property
    def spec(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinel_servers)
        if self.client_tls is None:
            return f"redis+sentinel://{hosts}/{self.master_name}"
        files = self.client_tls
        return (
            f"rediss+sentinel://{hosts}/{self.master_name}?ssl_ca_certs={files.ca}"
            f"&ssl_certfile={files.cert}&ssl_keyfile={files.key}"
        )

    def command(self, port: int, *args: str, timeout: float = 2.0) -> str:
        """``redis_command`` to a server or Sentinel of this group (over TLS when it is)."""
        return redis_command(port, *args, timeout=timeout, tls=self.client_tls)

    def info(self, port: int, section: str = "replication") -> dict[str, str]:
        """``INFO <section>`` of a server of this group."""
        return redis_info(port, section, tls=self.client_tls)

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for sentinel in self.sentinel_servers:
            sentinel.start()
        self.wait_settled()

    def wait_settled(self, timeout: float = 40.0) -> None:
        """Wait until every Sentinel knows the primary and all replicas are linked to it.

        Returns as soon as it is; the bound is for a CI machine whose two cores run two test
        workers (20 s was missed once there), and the error says which condition was missing.
        """
        deadline = time.monotonic() + timeout
        want = len(self.servers) - 1
        seen = "nothing answered"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                primary = self.primary_port()
                views = [self.sentinel_view(s.port) for s in self.sentinel_servers]
                seen = f"primary {primary}, sentinels see {views}"
                if primary is not None and all(v == primary for v in views):
                    info = self.info(primary)
                    links = sum(
                        1 for k, v in info.items() if k.startswith("slave") and "state=online" in v
                    )
                    seen += f", role {info.get('role')}, {links} of {want} replicas online"
                    if info.get("role") == "master" and links >= want:
                        return
            time.sleep(0.1)
        raise ServerError(f"Redis HA not settled within {timeout} s (last seen: {seen})")

    def sentinel_view(self, sentinel_port: int) -> int | None:
        reply = _resp_parse(
            self.command(
                sentinel_port, "SENTINEL", "get-master-addr-by-name", self.master_name
            ).encode(),
            0,
        )[0]
        return int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else None

    def primary_port(self) -> int | None:
        """The primary's port according to the first Sentinel that answers."""
        for sentinel in self.sentinel_servers:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return self.sentinel_view(sentinel.port)
        return None

    def server(self, port: int) -> RedisReplicaServer:
        return next(s for s in self.servers if s.port == port)

    def failover_epoch(self) -> int:
        """The primary's config epoch as the first answering Sentinel reports it."""
        for sentinel in self.sentinel_servers:
            with contextlib.suppress(OSError, ValueError, IndexError):
                reply = _resp_parse(
                    self.command(sentinel.port, "SENTINEL", "master", self.master_name).encode(),
                    0,
                )[0]
                fields = dict(zip(reply[::2], reply[1::2], strict=False))
                return int(fields["config-epoch"])
        return -1

    def wait_primary_change(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until the Sentinels report a primary other than ``old_port``; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port is not None and port != old_port:
                with contextlib.suppress(OSError):
                    if self.info(port).get("role") == "master":
                        return port
            time.sleep(0.05)
        raise ServerError(f"no failover away from {old_port} within {timeout} s")

    def stop(self) -> None:
        for proc in [*self.sentinel_servers, *self.servers]:
            proc.stop()

    def cleanup(self) -> None:
        for proc in [*self.sentinel_servers, *self.servers]:
            remove_run_dir(proc)


class PostgresServer(ServerProcess):
    """PostgreSQL 15 in a throw-away data directory, run as the ``postgres`` user when root."""

    name = "postgres"
    ready_timeout = 30.0

    def __init__(
        self,
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        exec_prefix: Sequence[str] = (),
        tls: CertFiles | None = None,
    ) -> None:
        super().__init__(run_dir=run_dir, port=port, host=host, exec_prefix=exec_prefix, tls=tls)
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
        if self.host != "127.0.0.1":
            # initdb trusts loopback only; on a simulated host clients come from the host's own
            # subnet ("samenet": the /24 of its one interface, nothing beyond it).
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        if self.tls is not None:
            self._prepare_tls(kwargs)

    def _prepare_tls(self, owner: dict[str, Any]) -> None:
        """TLS only over TCP, with a client certificate issued by the CA (``hostssl`` with
        ``clientcert=verify-ca``), streaming replication included; the key is copied where the
        postgres user may read it."""
        self._copy_tls(owner)
        nets = ["127.0.0.1/32", "::1/128"] + (["samenet"] if self.host != "127.0.0.1" else [])
        lines = ["local all all trust"] + [
            f"hostssl {db} all {net} trust clientcert=verify-ca"
            for db in ("all", "replication")
            for net in nets
        ]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _copy_tls(self, owner: dict[str, Any]) -> None:
        """The certificate, key and CA where the postgres user may read them (``pg_dir/tls``):
        the server's own, and what a standby presents to its primary."""
        assert self.tls is not None
        tls_dir = self.pg_dir / "tls"
        tls_dir.mkdir(exist_ok=True)
        for src, name in ((self.tls.cert, "server.pem"), (self.tls.key, "server-key.pem"),
                          (self.tls.ca, "ca.pem")):  # fmt: skip
            shutil.copyfile(src, tls_dir / name)
            (tls_dir / name).chmod(0o600)
            if owner:
                os.chown(tls_dir / name, owner["user"], owner["group"])
        if owner:
            os.chown(tls_dir, owner["user"], owner["group"])

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
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            *self._tls_options(),
        ]  # fmt: skip

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        tls_dir = self.pg_dir / "tls"
        return [
            "-c", "ssl=on",
            "-c", f"ssl_cert_file={tls_dir / 'server.pem'}",
            "-c", f"ssl_key_file={tls_dir / 'server-key.pem'}",
            "-c", f"ssl_ca_file={tls_dir / 'ca.pem'}",
            "-c", "ssl_min_protocol_version=TLSv1.2",
        ]  # fmt: skip

    def popen_kwargs(self) -> dict[str, Any]:
        return {"cwd": self.pg_dir}

    def cleanup(self) -> None:
        """Remove the cluster's data directory (after ``stop``)."""
        shutil.rmtree(self.pg_dir, ignore_errors=True)

    def is_ready(self) -> bool:
        if not port_open(self.port, self.host):
            return False
        result = subprocess.run(
            [str(install.postgres_bin_dir() / "pg_isready"), "-h", self.host,
             "-p", str(self.port), "-U", "postgres", "-q"],
            check=False,
        )  # fmt: skip
        return result.returncode == 0

    @property
    def dsn(self) -> str:
        """The client DSN: with TLS, ``sslmode=verify-full`` against the CA (the certificate
        must name the host) and this process's client certificate."""
        base = f"postgresql://postgres@{self.host}:{self.port}/postgres"
        if self.tls is None:
            return base
        return f"{base}?{self.ssl_params()}"

    def ssl_params(self, where: Path | None = None) -> str:
        """``sslmode=verify-full`` with the CA and this server's certificate as the client's
        (the files under ``where``, else the ones given), as URL query parameters."""
        assert self.tls is not None
        ca, cert, key = self.tls.ca, self.tls.cert, self.tls.key
        if where is not None:
            ca, cert, key = where / "ca.pem", where / "server.pem", where / "server-key.pem"
        return f"sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}"

    def conninfo(self, host: str = "127.0.0.1") -> str:
        """A libpq key/value connection string to this server, for psql and pg_basebackup."""
        params = self.ssl_params().replace("&", " ") if self.tls is not None else ""
        return f"host={host} port={self.port} user=postgres dbname=postgres {params}".strip()


class PostgresStandby(PostgresServer):
    """A streaming-replication standby of ``primary``: ``pg_basebackup -R`` (run as the
    ``postgres`` user, like the server) into its own data directory, started on its own port;
    ``promote()`` makes it the primary (``pg_ctl promote``, what an operator or a Patroni-style
    manager does after the primary died)."""

    name = "postgres-standby"

    def __init__(
        self,
        primary: PostgresServer,
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        tls: CertFiles | None = None,
    ) -> None:
        super().__init__(run_dir=run_dir, port=port, tls=tls)
        self.primary = primary

    def prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        kwargs = self._as_postgres()
        if kwargs:
            os.chown(self.pg_dir, kwargs["user"], kwargs["group"])
        # The primary's address, over TLS when the primary serves it. ``-R`` writes this
        # connection's parameters as the standby's ``primary_conninfo``, so the standby streams
        # over TLS too (verify-full, presenting its certificate from the copy the postgres user
        # reads); the primary's pg_hba.conf (TLS only) comes along in the base backup.
        source = f"host=127.0.0.1 port={self.primary.port} user=postgres"
        if self.primary.tls is not None:
            if self.tls is None:
                raise ServerError("a standby of a TLS primary needs a certificate (tls=)")
            self._copy_tls(kwargs)
            source += " " + self.ssl_params(self.pg_dir / "tls").replace("&", " ")
        subprocess.run(
            [*self._as_postgres_prefix(), str(install.postgres_bin_dir() / "pg_basebackup"),
             "-d", source, "-D", str(self.data_dir), "-R", "-X", "stream", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.pg_dir,
        )  # fmt: skip

    def _as_postgres_prefix(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]

    def promote(self) -> None:
        subprocess.run(
            [*self._as_postgres_prefix(), str(install.postgres_bin_dir() / "pg_ctl"),
             "promote", "-w", "-D", str(self.data_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.pg_dir,
        )  # fmt: skip

    def is_primary(self) -> bool:
        """True once promoted (``pg_is_in_recovery()`` is false)."""
        result = subprocess.run(
            [str(install.postgres_bin_dir() / "psql"), self.conninfo(),
             "-Atc", "SELECT pg_is_in_recovery()"],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        return result.returncode == 0 and result.stdout.strip() == "f"


def multi_host_dsn(*servers: PostgresServer) -> str:
    """A DSN naming every server; libpq-style ``target_session_attrs=read-write`` makes the
    client connect to the one that accepts writes (the primary, or the promoted standby).
    Over TLS (the first server's): ``sslmode=verify-full`` with its certificate as client's."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    dsn = f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"
    return dsn + (f"&{servers[0].ssl_params()}" if servers[0].tls is not None else "")


class KafkaBroker(ServerProcess):
    """The Kafka-compatible broker ``tansu`` with in-memory storage (a restart loses topics).

    With ``tls``: clients reach it over TLS with a client certificate on ``port`` through
    ``pkg.devstack.tlsproxy`` (tansu in the wheel cannot serve TLS itself), the broker listening
    on a second loopback port and advertising the TLS one.
    """

    name = "tansu"

    def command(self) -> Sequence[str]:
        url = f"tcp://{self.host}:{self.port}"
        listen = url
        if self.tls is not None:
            self.inner_port = getattr(self, "inner_port", 0) or free_port()
            listen = f"tcp://{self.host}:{self.inner_port}"
        broker = [
            str(install.tansu_binary()),
            "broker",
            "--listener-url", listen,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        if self.tls is None:
            return broker
        return [
            sys.executable, "-m", "pkg.devstack.tlsproxy", "--host", self.host,
            "--listen", str(self.port), "--to", str(self.inner_port),
            "--cert", str(self.tls.cert), "--key", str(self.tls.key), "--ca", str(self.tls.ca),
            "--", *broker,
        ]  # fmt: skip

    def is_ready(self) -> bool:
        if self.tls is None:
            return port_open(self.port, self.host)
        return port_open(self.port, self.host) and port_open(self.inner_port, self.host)

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}}

    @property
    def bootstrap(self) -> str:
        """``host:port``, or ``ssl://host:port`` (``pkg.common.kafkaconn``) with TLS."""
        scheme = "ssl://" if self.tls is not None else ""
        return f"{scheme}{self.host}:{self.port}"


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
        *,
        host: str = "127.0.0.1",
        exec_prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.ready_timeout = ready_timeout
        super().__init__(run_dir=run_dir, port=port, host=host, exec_prefix=exec_prefix)
        self._command = [part.replace("{port}", str(self.port)) for part in command]
        self._env = env or {}
        self.ready_port = ready_port or self.port

    def command(self) -> Sequence[str]:
        return self._command

    def popen_kwargs(self) -> dict[str, Any]:
        return {"env": {**os.environ, "PYTHONUNBUFFERED": "1", **self._env}}

    def is_ready(self) -> bool:
        return port_open(self.ready_port, self.host)


# -- Prometheus ---------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    return sum(int(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def scaled_rules(text: str, factor: float, min_window_s: float) -> str:
    """Rule file ``text`` with every ``for:``, range ``[...]`` and ``offset`` multiplied by
    ``factor``.

    The local platform's faults last seconds where production's last minutes: the same
    expressions and thresholds, on a shorter clock, so a drill sees the alert a production
    outage would raise. Range windows keep at least ``min_window_s`` (a few scrapes) so that
    ``rate`` still has samples to work on.
    """

    def window(match: re.Match[str]) -> str:
        return f"[{_duration(max(min_window_s, _seconds(match.group(1)) * factor))}]"

    def hold(match: re.Match[str]) -> str:
        return f"{match.group(1)}{_duration(_seconds(match.group(2)) * factor)}"

    text = re.sub(r"\[((?:\d+(?:ms|s|m|h))+)\]", window, text)
    text = re.sub(r"(\boffset\s+)((?:\d+(?:ms|s|m|h))+)", hold, text)
    return re.sub(r"(\bfor:\s*)((?:\d+(?:ms|s|m|h))+)", hold, text)


class PrometheusServer(ServerProcess):
    """Debian's Prometheus server scraping the given targets, with the given rule files.

    Its configuration, rules and data live under ``run_dir``: the package's system daemon is
    never involved. ``targets`` maps a job name to ``host:port`` addresses serving ``/metrics``;
    ``rule_files`` are copied in, scaled by ``time_scale`` (``scaled_rules``).
    """

    name = "prometheus"
    ready_timeout = 30.0

    def __init__(
        self,
        targets: dict[str, list[str]],
        rule_files: Sequence[Path],
        run_dir: Path | None = None,
        port: int | None = None,
        *,
        scrape_interval_s: float = 1.0,
        time_scale: float = 1.0,
        bearer_token: str = "",
        scrape_tls: CertFiles | None = None,
    ) -> None:
        super().__init__(run_dir, port)
        self.targets = targets
        # /metrics is for operators (docs/security.md): Prometheus scrapes with this credential.
        self.bearer_token = bearer_token
        # HTTPS scrapes with this client certificate (targets requiring mTLS).
        self.scrape_tls = scrape_tls
        self.rule_files = list(rule_files)
        self.scrape_interval_s = scrape_interval_s
        self.time_scale = time_scale

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        rules = []
        for source in self.rule_files:
            target = self.run_dir / source.name
            text = source.read_text()
            if self.time_scale != 1.0:
                text = scaled_rules(text, self.time_scale, 5 * self.scrape_interval_s)
            target.write_text(text)
            rules.append(str(target))
        interval = _duration(self.scrape_interval_s)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": _duration(min(10.0, self.scrape_interval_s))},
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}],
                 **({"authorization": {"type": "Bearer", "credentials": self.bearer_token}}
                    if self.bearer_token else {}),
                 **self._scheme()}
                for job, addresses in sorted(self.targets.items())
            ],
        }  # fmt: skip
        # JSON is YAML: no YAML library needed to write Prometheus' configuration.
        (self.run_dir / "prometheus.yml").write_text(json.dumps(config, indent=2))

    def _scheme(self) -> dict[str, Any]:
        if self.scrape_tls is None:
            return {}
        return {
            "scheme": "https",
            "tls_config": {
                "ca_file": str(self.scrape_tls.ca),
                "cert_file": str(self.scrape_tls.cert),
                "key_file": str(self.scrape_tls.key),
            },
        }

    def command(self) -> Sequence[str]:
        return [
            str(install.prometheus_binary()),
            f"--config.file={self.run_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.run_dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={self.host}:{self.port}",
            "--log.level=warn",
        ]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=0.5) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False
