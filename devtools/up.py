"""./dev up: the whole platform on 127.0.0.1 with a live status view, until Ctrl-C.

HA mode (default): Redis, PostgreSQL and the Kafka-compatible broker (tansu), two replicas each of
Foghorn, Bridge and Signalman, and a simulated edge fleet. ``--single``: one instance of each
service on in-memory state, no servers at all. External servers can be given by URL instead of
started here. Everything started is stopped on exit (by pid), nothing else.
``--hosts``: every server and replica on a simulated host of its own (a network namespace with
its own address, see ``devtools.hosts``); the namespaces are removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from devtools import alerts
from devtools import hosts as simhosts
from devtools.devtls import DevTls
from devtools.supervisor import Managed, RestartPolicy, Supervisor, fetch_health
from pkg.common.kafkaconn import kafka_options
from pkg.common.logging import configure_logging
from pkg.devstack import install
from pkg.devstack.servers import (
    CommandProcess,
    KafkaBroker,
    PostgresServer,
    PrometheusServer,
    RedisServer,
    free_port,
)
from pkg.events.kafka import DEFAULT_TOPIC

log = structlog.get_logger("dev-up")

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The tenants whose streams the simulated fleet carries (api_balancing.simulator.TENANTS), so
# their events flow from the first seconds; the README's tour subscribes as "acme".
EVENT_TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")


def signalman_tenant_token(tenant: str) -> str:
    """The dev Signalman credential Bridge subscribes with for ``tenant``."""
    return f"dev-sig-{tenant}"


def signalman_tenant_tokens() -> str:
    """PLATFORM_TOKENS entries for Bridge's per-tenant Signalman credentials."""
    return ",".join(
        f"{signalman_tenant_token(t)}=bridge@{t}:tenant-user" for t in ("demo", *EVENT_TENANTS)
    )


# Dev credentials, one per role (docs/security.md); ./dev up prints them. Never use in production.
OPERATOR_TOKEN = "dev-operator-token"  # foghorn-admin, signalman-tail system, full /health
NODE_TOKEN = "dev-node-token"  # the simulated edge fleet (node ids edge-*, drill-*)
RELAY_TOKEN = "dev-relay-token"  # Foghorn replica to replica (command relay)
SYSTEM_TOKEN = "dev-system-token"  # the platform's own event publishing
BRIDGE_FOGHORN_TOKEN = "dev-bridge-foghorn-token"  # Bridge -> Foghorn (fleet queries, modes)
SIGNALMAN_DEMO_TOKEN = "dev-sig-demo"  # Bridge -> Signalman for tenant "demo" (see below)
DEV_TOKEN = OPERATOR_TOKEN  # the name older callers use
PLATFORM_TOKENS = ",".join(
    [
        f"{OPERATOR_TOKEN}=dev-operator:operator",
        f"{NODE_TOKEN}=dev-edge-fleet:node;nodes=edge-*|drill-*;tenants=*;streams=100000",
        f"{RELAY_TOKEN}=dev-foghorn-relay:replica",
        f"{SYSTEM_TOKEN}=dev-platform:system",
        f"{BRIDGE_FOGHORN_TOKEN}=dev-bridge:operator",
        signalman_tenant_tokens(),  # Bridge -> Signalman, one tenant-user per tenant
    ]
)
CREDENTIALS = (
    ("operator", OPERATOR_TOKEN, "foghorn-admin, signalman-tail system, full /health, /metrics"),
    ("node", NODE_TOKEN, "edge node control streams (node ids edge-*, drill-*)"),
    ("replica", RELAY_TOKEN, "Foghorn replica-to-replica relay"),
    ("system", SYSTEM_TOKEN, "platform event publishing"),
    ("tenant-user", "dev-sig-<tenant>", "a tenant's events on Signalman (Bridge uses them)"),
)
BRIDGE_JWT_SECRET = "dev-bridge-secret-change-me-0123456789"
EVENTS_TOPIC = DEFAULT_TOPIC
EVENTS_PARTITIONS = 6
# The HA stores run on 127.0.0.1 of the load host (Sentinels announce loopback addresses), which
# services inside their own network namespaces cannot reach: the two modes do not combine yet.
HOSTS_HA_STORES = (
    "--ha-stores cannot be combined with --hosts: the Sentinel-managed Redis and the PostgreSQL "
    "standby run on 127.0.0.1, which services on simulated hosts cannot reach. Run the store "
    "failover drills without --hosts (./dev drill redis-failover), the partition drills with it."
)


@dataclass
class Backends:
    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    postgres_dsn: str | None = None


@dataclass
class Stack:
    """What ./dev up started: the supervisor plus the addresses a person needs."""

    sup: Supervisor
    run_dir: Path
    backends: Backends
    endpoints: dict[str, list[str]] = field(default_factory=dict)
    # Ports chosen before their service is built (another service is told of them first).
    ports: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # --env NAME=VALUE settings given to every service process (the drills shorten TTLs).
    extra_env: dict[str, str] = field(default_factory=dict)
    # The last figures shown per process, so counters are shown as rates (routes/s ...).
    shown: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    # --hosts: each process on its own simulated host (None: everything on 127.0.0.1).
    hosts: simhosts.HostPlan | None = None
    # --ha-stores: the Sentinel-managed Redis and the PostgreSQL pair (devtools.ha_stores).
    ha_stores: Any = None
    # The local Prometheus scraping every process (None: not started, e.g. --single).
    prometheus_url: str | None = None
    # --port-offset: added to every documented port (a second platform on the same host).
    port_offset: int = 0
    # --tls: the run's CA and the certificates it issued (None: plaintext everywhere).
    tls: DevTls | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def _tls_address(self, name: str) -> str:
        try:
            return self.address(name)
        except KeyError:  # a process on the load host (--hosts)
            return "127.0.0.1"

    def tls_env(self, name: str, client_auth: str = "require") -> dict[str, str]:
        """``PLATFORM_TLS_*`` of process ``name`` (empty without --tls)."""
        if self.tls is None:
            return {}
        return self.tls.service_env(name, self._tls_address(name), client_auth)

    def server_tls(self, name: str) -> dict[str, Any]:
        """``tls=`` keyword of a store server (nothing without --tls)."""
        return {"tls": self.tls.cert(name, self._tls_address(name))} if self.tls else {}

    def address(self, host: str) -> str:
        """The address a process on ``host`` binds and advertises."""
        return self.hosts.host(host).address if self.hosts else "127.0.0.1"

    def on_host(self, host: str) -> dict[str, Any]:
        """``host``/``exec_prefix`` keyword arguments that run a process on ``host``."""
        if self.hosts is None:
            return {}
        h = self.hosts.host(host)
        return {"host": h.address, "exec_prefix": h.exec_prefix()}


def _service_available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create the events topic (idempotent) with the partition count Signalman scales on."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**kafka_options(bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


ServiceBuilder = Callable[[Stack, argparse.Namespace], None]
SERVICE_BUILDERS: list[ServiceBuilder] = []


def service_builder(fn: ServiceBuilder) -> ServiceBuilder:
    SERVICE_BUILDERS.append(fn)
    return fn


def add_process(
    stack: Stack,
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    health_url: str | None = None,
    ready_port: int | None = None,
    host: str | None = None,
) -> Managed:
    """Start ``command`` as ``name`` (on simulated host ``host``, default: one named like the
    process, when the stack runs on hosts)."""
    proc = CommandProcess(
        name,
        command,
        run_dir=stack.run_dir / name,
        port=port,
        env={
            "PLATFORM_TOKENS": PLATFORM_TOKENS,
            **stack.tls_env(host or name),
            **env,
            **stack.extra_env,
        },
        ready_port=ready_port,
        ready_timeout=60,
        **stack.on_host(host or name),
    )
    return stack.sup.add(Managed(name, proc, health_url=health_url, policy=RestartPolicy()))


def start_servers(stack: Stack, args: argparse.Namespace) -> None:
    b = stack.backends
    if args.single:
        return
    if getattr(args, "ha_stores", False):
        from devtools import ha_stores

        stack.ha_stores = ha_stores.start(stack)
    if not b.redis_url:
        redis = RedisServer(
            run_dir=stack.run_dir / "redis",
            **_server_port(stack, "redis", 6379),
            **stack.server_tls("redis"),
        )
        stack.sup.add(Managed("redis", redis, kind="server"))
        b.redis_url = redis.url
    if not b.postgres_dsn:
        pg = PostgresServer(
            run_dir=stack.run_dir / "postgres",
            **_server_port(stack, "postgres", 5432),
            **stack.server_tls("postgres"),
        )
        stack.sup.add(Managed("postgres", pg, kind="server"))
        b.postgres_dsn = pg.dsn
    if not b.kafka_bootstrap:
        broker = KafkaBroker(
            run_dir=stack.run_dir / "tansu",
            **_server_port(stack, "tansu", 9092),
            **stack.server_tls("tansu"),
        )
        stack.sup.add(Managed("tansu", broker, kind="server"))
        b.kafka_bootstrap = broker.bootstrap
    asyncio.run(create_topic(b.kafka_bootstrap, EVENTS_TOPIC, EVENTS_PARTITIONS))


def _server_port(stack: Stack, host: str, port: int) -> dict[str, Any]:
    """On hosts a server gets its usual port on its own address; on loopback a free port."""
    return {"port": port, **stack.on_host(host)} if stack.hosts else {}


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    return text[:width].ljust(width)


# Cumulative counters a service reports in its health "figures", shown as rates.
RATE_FIGURES = {"reports": "reports/s", "routes": "routes/s", "requests": "requests/s"}


def _figures(stack: Stack, name: str, health: dict[str, Any]) -> str:
    figures = health.get("figures") or {}
    if not isinstance(figures, dict):
        return ""
    now = time.monotonic()
    before_at, before = stack.shown.get(name, (now, {}))
    stack.shown[name] = (now, figures)
    parts = []
    for key, value in figures.items():
        if key in RATE_FIGURES and isinstance(value, int | float):
            if key in before and now - before_at > 0.5:
                rate = max(0.0, (value - before[key]) / (now - before_at))
                parts.append(f"{RATE_FIGURES[key]}={rate:.1f}")
            continue
        shown = f"{value:.2f}" if isinstance(value, float) else value
        parts.append(f"{key}={shown}")
    return " ".join(parts)


# Recorded figures shown under the table (deploy/prometheus/rules.yml), with their format.
PROMETHEUS_FIGURES = (
    ("job:foghorn_routing_decisions:rate1m{foghorn}", "routes/s", "{:.1f}"),
    ("job:foghorn_routing_decision_seconds:p99_5m{foghorn}", "route p99 ms", "{:.2f}", 1000),
    ("job:foghorn_ha_sync_lag_seconds:p99_5m{foghorn}", "sync lag p99 ms", "{:.1f}", 1000),
    ("job:bridge_http_responses:rate1m{bridge}", "bridge req/s", "{:.1f}"),
    ("job:bridge_http_5xx:ratio_rate5m{bridge}", "bridge 5xx %", "{:.2f}", 100),
    ("job:signalman_events_appended:rate1m{signalman}", "events/s", "{:.1f}"),
    ("job:signalman_consumer_lag:sum{signalman}", "consumer lag", "{:.0f}"),
    ("job:events_buffered:sum{foghorn}", "events buffered", "{:.0f}"),
)


def _prometheus_lines(url: str) -> list[str]:
    found = alerts.firing(url, timeout=0.3)
    figures = alerts.recorded(url, timeout=0.3)
    shown = []
    for key, label, fmt, *scale in PROMETHEUS_FIGURES:
        if key in figures and figures[key] == figures[key]:  # (NaN: no traffic yet)
            shown.append(f"{label}={fmt.format(figures[key] * (scale[0] if scale else 1))}")
    lines = ["", f"prometheus         {url}   {' '.join(shown)}"]
    if found is None:
        lines.append("alerts:            (Prometheus not answering)")
    elif not found:
        lines.append("alerts:            none firing")
    else:
        lines.append(f"alerts:            {len(found)} firing")
        lines.extend(f"  {a.describe()}"[:160] for a in found[:8])
    return lines


def render(stack: Stack) -> str:
    lines = [
        f"platform up  run dir: {stack.run_dir}   {time.strftime('%H:%M:%S')}   Ctrl-C stops all",
        "",
        f"{'process':18} {'state':9} {'pid':>7} {'restarts':>8}  {'health':10} key figures",
    ]
    for item in stack.sup.items:
        health = item.health.get("status", "-") if item.health_url else "-"
        lines.append(
            f"{_cell(item.name, 18)} {_cell(item.state, 9)} {item.pid or '-':>7} "
            f"{item.restarts:>8}  {_cell(health, 10)} {_figures(stack, item.name, item.health)}"
        )
    lines.append("")
    for name, urls in stack.endpoints.items():
        lines.append(f"{name:18} {' '.join(urls)}")
    lines.extend(stack.notes)
    if stack.ha_stores is not None:
        lines.extend(stack.ha_stores.status_lines())
    if stack.prometheus_url:
        lines.extend(_prometheus_lines(stack.prometheus_url))
    if stack.sup.events:
        lines.append("")
        lines.append("recent events:")
        lines.extend("  " + e for e in stack.sup.events[-6:])
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./dev up", description=__doc__)
    p.add_argument("--single", action="store_true", help="one instance each, in memory")
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every hop and mTLS between services, with a throwaway CA under the run "
        "directory (docs/tls.md)",
    )
    p.add_argument(
        "--ha-stores",
        action="store_true",
        help="Redis as 1 primary + 2 replicas + 3 Sentinels, PostgreSQL as primary + standby",
    )
    p.add_argument(
        "--replicas", type=int, default=2, help="replicas of each service in HA mode (default 2)"
    )
    p.add_argument("--nodes", type=int, default=50, help="simulated edge nodes")
    p.add_argument(
        "--viewers",
        type=float,
        default=5.0,
        help="viewer routing requests/s, each to Foghorn and through Bridge (0: none)",
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    p.add_argument("--postgres-dsn", default=os.environ.get("POSTGRES_DSN"))
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--duration", type=float, default=0, help="stop after N s (0: Ctrl-C)")
    p.add_argument("--plain", action="store_true", help="print status lines, no redraw")
    p.add_argument(
        "--rules-time-scale",
        type=float,
        default=alerts.DEV_TIME_SCALE,
        metavar="F",
        help="alert rules' hold times and windows times F on this platform "
        f"(default {alerts.DEV_TIME_SCALE:g}: faults last seconds here, minutes in production)",
    )
    p.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add this to every documented port (18008, 8080, 18070, 9090 ...), to run beside "
        "another platform on this host (a port still taken is replaced by a free one)",
    )
    p.add_argument(
        "--no-prometheus",
        action="store_true",
        help="do not start Prometheus (it scrapes every process and evaluates the alert rules)",
    )
    p.add_argument(
        "--hosts",
        action="store_true",
        help="each server and replica on its own simulated host (network namespace, own "
        "address; needs root); removed on exit",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every service process (repeatable), "
        "e.g. FOGHORN_OWNERSHIP_TTL_S=5",
    )
    return p


def parse_env(items: list[str]) -> dict[str, str]:
    """``["A=1", "B=x"]`` -> ``{"A": "1", "B": "x"}``; a malformed item raises ValueError."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise ValueError(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def build_stack(args: argparse.Namespace, should_stop: Callable[[], bool] = lambda: False) -> Stack:
    """Start servers and every service per ``args`` (see ``parser()``); the caller must call
    ``stop_stack`` (also when this raises: the partial stack is attached to the exception)."""
    run_dir = args.run_dir or ROOT / ".run" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.single:
        install.ensure_all()
    stack = Stack(
        sup=Supervisor(health_fetcher=functools.partial(fetch_health, token=OPERATOR_TOKEN)),
        run_dir=run_dir,
        backends=Backends(args.redis_url, args.kafka_bootstrap, args.postgres_dsn),
        extra_env=parse_env(getattr(args, "env", None) or []),
        hosts=simhosts.HostPlan.from_env() if getattr(args, "hosts", False) else None,
        port_offset=getattr(args, "port_offset", 0),
    )
    if not 0 <= stack.port_offset <= 20000:
        raise ValueError(f"--port-offset must be within 0..20000, got {stack.port_offset}")
    if stack.hosts is not None and getattr(args, "ha_stores", False):
        raise ValueError(HOSTS_HA_STORES)
    if getattr(args, "tls", False):
        stack.tls = DevTls(run_dir)
        stack.tls.enable_for_this_process()
    if stack.hosts is not None and not simhosts.inside():
        raise RuntimeError(
            "--hosts stacks are built by a harness on the load host (hosts.run_harness)"
        )
    try:
        start_servers(stack, args)
        for build in SERVICE_BUILDERS:
            if should_stop():
                break
            build(stack, args)
    except BaseException as exc:
        exc.add_note(f"partial stack in {run_dir}")
        stop_stack(stack)
        raise
    stack.notes.append(
        "dev credentials: "
        + "  ".join(f"{role}={token}" for role, token, _ in CREDENTIALS)
        + "  (docs/security.md)"
    )
    if stack.tls is not None:
        stack.notes.append(
            f"transport:        TLS on every hop (servers included), mTLS between services; "
            f"CA {stack.tls.ca.ca_path}, certificates in {stack.tls.dir}"
        )
        mine = stack.tls.cert("harness")
        stack.notes.append(
            f"TLS for the CLIs: export PLATFORM_TLS_CA={mine.ca} "
            f"PLATFORM_TLS_CERT={mine.cert} PLATFORM_TLS_KEY={mine.key}"
        )
    if stack.hosts is not None:
        harness = stack.hosts.host(simhosts.HARNESS_HOST)
        stack.notes.append(
            f"on hosts:         these addresses answer inside the hosts only: prefix commands "
            f"with `ip netns exec {harness.netns}`"
        )
    return stack


def stop_stack(stack: Stack) -> None:
    """Stop everything the stack started (reverse order, by pid) and remove server data."""
    stack.sup.stop_all()
    for item in stack.sup.items:
        item.proc.cleanup()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.hosts and args.ha_stores:
        print(HOSTS_HA_STORES)
        return 2
    if args.hosts and args.single:
        print(
            "--hosts runs the HA platform on simulated hosts: it cannot be combined with --single"
        )
        return 2
    if args.hosts and not simhosts.inside():
        return simhosts.run_harness(["up", *argv])
    run_dir = args.run_dir or ROOT / ".run" / time.strftime("%Y%m%d-%H%M%S")
    args.run_dir = run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # The status view owns the terminal; supervisor events go to a log file as well.
    log_file = (run_dir / "up.log").open("a", buffering=1)
    configure_logging("dev-up", json=True, stream=log_file)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    stack: Stack | None = None
    try:
        stack = build_stack(args, should_stop=lambda: stopping)
        tty = sys.stdout.isatty() and not args.plain
        last_plain = 0.0
        ready = False
        while not stopping:
            stack.sup.tick()
            now = time.monotonic()
            if not ready and stack.sup.all_healthy():
                ready = True
                note = f"every health check ok {now - started:.1f} s after ./dev up started"
                stack.notes.insert(0, note)
                log.info("platform_ready", seconds=round(now - started, 1))
                if not tty:
                    print(note, flush=True)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + render(stack) + "\n")
                sys.stdout.flush()
            elif now - last_plain >= 10:
                print(render(stack), flush=True)
                last_plain = now
            if args.duration and now - started >= args.duration:
                break
            time.sleep(1.0)
    finally:
        if stack is not None:
            print("\nstopping everything ./dev up started...", flush=True)
            stop_stack(stack)
        print(f"stopped. logs: {run_dir}", flush=True)
        log_file.close()
    return 0


# Service builders, registered in start order. Fixed, documented ports when free (the README's
# examples use them), a free port otherwise.
def _port(preferred: int, stack: Stack | None = None) -> int:
    """The documented port; on loopback a free one when it is taken (on hosts every replica has
    an address of its own, so the documented port is always free there)."""
    from pkg.devstack.servers import port_open

    if stack is not None and stack.hosts is not None:
        return preferred
    if stack is not None:
        preferred += stack.port_offset
    return free_port() if port_open(preferred) or not _bindable(preferred) else preferred


def _bindable(port: int) -> bool:
    """Whether a server could listen on ``port`` now: nothing listens there may still not be
    enough (an outgoing connection's local port, or its TIME_WAIT, refuses the bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers set it
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _replicas(args: argparse.Namespace) -> int:
    return 1 if args.single else max(1, getattr(args, "replicas", 2))


def _signalman_ports(stack: Stack, args: argparse.Namespace) -> list[int]:
    """Signalman's gRPC ports, chosen once (Foghorn needs them before Signalman is built)."""
    if "signalman grpc" not in stack.ports:
        stack.ports["signalman grpc"] = [_port(18070 + i, stack) for i in range(_replicas(args))]
    return stack.ports["signalman grpc"]


@service_builder
def foghorn(stack: Stack, args: argparse.Namespace) -> None:
    grpc_targets = []
    for i in range(_replicas(args)):
        grpc_port, http_port = _port(18008 + i, stack), _port(18080 + i, stack)
        addr = stack.address(f"foghorn-{i}")
        env = {
            "FOGHORN_HOST": addr,  # binds and advertises (relay target, ownership records)
            "FOGHORN_GRPC_PORT": str(grpc_port),
            "FOGHORN_HTTP_PORT": str(http_port),
            "FOGHORN_REPLICA_ID": f"foghorn-{i}",
            "FOGHORN_CLUSTER": "dev",
            "FOGHORN_REDIS_URL": stack.backends.redis_url or "",
            "FOGHORN_KAFKA_BOOTSTRAP": stack.backends.kafka_bootstrap or "",
        }
        if not stack.backends.kafka_bootstrap:
            # No Kafka (--single): events reach Signalman through its Publish RPC.
            env["FOGHORN_SIGNALMAN_ADDRESSES"] = ",".join(
                f"{stack.address(f'signalman-{j}')}:{p}"
                for j, p in enumerate(_signalman_ports(stack, args))
            )
            env["FOGHORN_SIGNALMAN_TOKEN"] = SYSTEM_TOKEN  # Publish needs the system role
        add_process(
            stack,
            f"foghorn-{i}",
            [PY, "-m", "api_balancing"],
            env,
            port=grpc_port,
            health_url=f"{stack.scheme}://{addr}:{http_port}/health",
        )
        grpc_targets.append(f"{addr}:{grpc_port}")
        stack.endpoints.setdefault("foghorn http", []).append(
            f"{stack.scheme}://{addr}:{http_port}"
        )
    stack.endpoints["foghorn grpc"] = grpc_targets
    stack.notes.append(
        f"admin CLI:        .venv/bin/foghorn-admin --foghorn {','.join(grpc_targets)} "
        f"--token {DEV_TOKEN} nodes"
    )


@service_builder
def signalman(stack: Stack, args: argparse.Namespace) -> None:
    b = stack.backends
    targets = []
    for i, grpc_port in enumerate(_signalman_ports(stack, args)):
        http_port = _port(8070 + i, stack)
        addr = stack.address(f"signalman-{i}")
        env = {
            "SIGNALMAN_HOST": addr,
            "SIGNALMAN_GRPC_PORT": str(grpc_port),
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "SIGNALMAN_REPLICA_ID": f"signalman-{i}",
            "SIGNALMAN_KAFKA_BOOTSTRAP": b.kafka_bootstrap or "",
            "SIGNALMAN_TOPIC": EVENTS_TOPIC,
            # tansu holds every group join while less than half the session has passed, in 1 s
            # steps: 2 s gives the shortest join (1 s) and so the shortest rebalance. Only for
            # tansu: real Kafka refuses sessions under 6 s by default (docs/signalman.md).
            "SIGNALMAN_SESSION_TIMEOUT_MS": "2000",
            "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "200",  # detection within 0.2 s of expiry
            "SIGNALMAN_REDIS_URL": b.redis_url or "",
            "SIGNALMAN_POSTGRES_DSN": b.postgres_dsn or "",
        }
        add_process(
            stack,
            f"signalman-{i}",
            [PY, "-m", "api_realtime"],
            env,
            port=grpc_port,
            health_url=f"{stack.scheme}://{addr}:{http_port}/health",
        )
        targets.append(f"{addr}:{grpc_port}")
        # /health and /metrics: shown, so nobody has to find them with ss (docs/metrics.md)
        stack.endpoints.setdefault("signalman http", []).append(
            f"{stack.scheme}://{addr}:{http_port}"
        )
    stack.endpoints["signalman grpc"] = targets
    stack.notes.append(
        f"tail events:      .venv/bin/signalman-tail --targets {','.join(targets)} "
        f"--token {DEV_TOKEN} system"
    )


@service_builder
def bridge(stack: Stack, args: argparse.Namespace) -> None:
    urls = []
    for i in range(_replicas(args)):
        port = _port(8080 + i, stack)
        addr = stack.address(f"bridge-{i}")
        env = {
            "BRIDGE_REPLICA_ID": f"bridge-{i}",
            "BRIDGE_REDIS_URL": stack.backends.redis_url or "",
            "BRIDGE_FOGHORN_ADDRESSES": ",".join(stack.endpoints.get("foghorn grpc", [])),
            "BRIDGE_FOGHORN_TOKEN": BRIDGE_FOGHORN_TOKEN,
            "BRIDGE_JWT_HS256_SECRET": BRIDGE_JWT_SECRET,
            "BRIDGE_SIGNALMAN_ADDRESSES": ",".join(stack.endpoints.get("signalman grpc", [])),
            # One Signalman credential per tenant: Signalman takes the tenant from it.
            "BRIDGE_SIGNALMAN_TOKENS": ",".join(
                f"{t}={signalman_tenant_token(t)}" for t in ("demo", *EVENT_TENANTS)
            ),
            # Public: HTTPS without client certificates; its own calls present its certificate.
            **stack.tls_env(f"bridge-{i}", client_auth="none"),
        }
        add_process(
            stack,
            f"bridge-{i}",
            [PY, "-m", "api_gateway", "--host", addr, "--port", str(port), "--id", f"bridge-{i}"],
            env,
            port=port,
            health_url=f"{stack.scheme}://{addr}:{port}/health",
        )
        urls.append(f"{stack.scheme}://{addr}:{port}/graphql")
    stack.endpoints["bridge graphql"] = urls
    stack.notes.append(
        "bridge JWT:       "
        f"BRIDGE_JWT_HS256_SECRET={BRIDGE_JWT_SECRET} .venv/bin/python -m api_gateway.devtoken "
        "--tenant acme --roles operator   (tenant users: --roles user; events flow for acme, "
        "globex, initech, umbrella, hooli)"
    )


class PortlessProcess(CommandProcess):
    """A process that serves no port (the edge simulator, the viewer load): it is "ready" as
    soon as it runs."""

    def is_ready(self) -> bool:
        return self.running


@service_builder
def edge_fleet(stack: Stack, args: argparse.Namespace) -> None:
    targets = stack.endpoints.get("foghorn grpc", [])
    if not targets or args.nodes <= 0:
        return
    proc = PortlessProcess(
        "edge-sim",
        [PY, "-m", "api_balancing.simulator", "--foghorn", ",".join(targets),
         "--nodes", str(args.nodes), "--token", NODE_TOKEN,
         "--media-host", stack.address("nodes")],
        run_dir=stack.run_dir / "edge-sim",
        env=stack.tls_env("nodes", client_auth="none"),
        ready_timeout=60,
        **stack.on_host("nodes"),
    )  # fmt: skip
    stack.sup.add(Managed("edge-sim", proc, policy=RestartPolicy()))


__all__ = [
    "SERVICE_BUILDERS",
    "Stack",
    "build_stack",
    "main",
    "parser",
    "render",
    "service_builder",
    "stop_stack",
]


@service_builder
def viewers(stack: Stack, args: argparse.Namespace) -> None:
    foghorn, bridge = stack.endpoints.get("foghorn grpc", []), stack.endpoints.get("bridge graphql")
    if args.viewers <= 0 or not foghorn or args.nodes <= 0:
        return
    proc = PortlessProcess(
        "viewers",
        [PY, "-m", "devtools.viewers", "--foghorn", ",".join(foghorn),
         "--bridge", ",".join(bridge or []), "--rate", str(args.viewers)],
        run_dir=stack.run_dir / "viewers",
        env={
            "BRIDGE_JWT_HS256_SECRET": BRIDGE_JWT_SECRET,
            **stack.tls_env(simhosts.HARNESS_HOST, client_auth="none"),
        },
        **stack.on_host(simhosts.HARNESS_HOST),
    )  # fmt: skip
    stack.sup.add(Managed("viewers", proc, policy=RestartPolicy()))


@service_builder
def prometheus(stack: Stack, args: argparse.Namespace) -> None:
    """Prometheus scraping every service process, with the platform's alert and recording rules
    on the local clock (``alerts.DEV_TIME_SCALE``). Last: it needs every target's address."""
    if args.single or getattr(args, "no_prometheus", False):
        return
    targets: dict[str, list[str]] = {}
    for item in stack.sup.items:
        if item.health_url and item.kind == "service":
            address = urllib.parse.urlsplit(item.health_url).netloc
            targets.setdefault(item.name.rsplit("-", 1)[0], []).append(address)
    server = PrometheusServer(
        targets, alerts.RULE_FILES, run_dir=stack.run_dir / "prometheus",
        port=_port(9090, stack), time_scale=args.rules_time_scale, bearer_token=OPERATOR_TOKEN,
        scrape_tls=stack.tls.cert("prometheus") if stack.tls else None,
    )  # fmt: skip
    stack.sup.add(Managed("prometheus", server, kind="server"))
    stack.prometheus_url = server.url
    stack.endpoints["prometheus"] = [server.url, f"{server.url}/alerts"]
