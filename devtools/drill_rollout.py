"""The ``rollout`` drill: the scaling RFC's phases rolled out and back, as written, under traffic.

It starts from the embedded default (one in-memory Foghorn, an embedded Signalman E that Foghorn
publishes to, Bridge replicas in memory, an edge fleet that watches its replica file), sets a
node's mode as an operator would, then follows ``docs/rfcs/horizontal-scaling.md`` step by step:
Phase 1 (the HA replica beside the in-memory one, the nodes told of it and moved with
``move-nodes``, callers moved, the old replica retired, a second HA replica added and filled by
rebalancing), Phase 2 (Bridge onto Redis, a rolling restart) and Phase 3 (Kafka and PostgreSQL,
two Kafka replicas K1, K2 beside E, Foghorn's events switched to Kafka by a rolling restart,
subscribers' list to K1, K2, E retired), then the rollback of all three in reverse. Viewer
routing runs straight to Foghorn and through Bridge the whole time. Callers are never restarted
to follow a step: the direct callers (``pkg.clients.foghorn``) and Bridge
(``BRIDGE_FOGHORN_ADDRESSES``) take their Foghorn replicas from one watched list,
``file:<run dir>/callers-foghorn.txt``, and subscribers (the drill's, and Bridge's
``BRIDGE_SIGNALMAN_ADDRESSES``) their Signalman replicas from ``callers-signalman.txt``, which a
step edits as the RFC says (the same as changing the records of a ``dns:///`` name); a Foghorn
replica is retired only once the callers stopped routing to it (its
``foghorn_routing_decisions_total`` stays flat).

Events: the drill's numbered probe events (``EventFlow``) take the path Foghorn's events take:
Signalman's ``Publish`` RPC on E until Phase 3's step 3, Kafka from the moment the first Foghorn
replica publishes there ("Phase 3 on"), E2's ``Publish`` again from the moment the first
Foghorn replica is switched back. Subscribers following the list count them by id: every event
produced from Phase 3 on must reach every subscriber once (``lost_events``,
``duplicate_events``); the ones before are counted too (``facts.before_phase3``).

Each step is a row of ``facts.steps``: what it did, how long it took, its own failed/total
routings and the events produced during it (lost, duplicated, slowest delivery).
``facts.state_kept`` is true when after every step every Foghorn replica holding a record of
the node reported the operator's mode and reason (and at least one held one).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from devtools import drills, up
from devtools.devtls import DevTls, grpc_credentials, http_verify
from devtools.drill_traffic import BridgeViewers, EventFlow, FoghornViewers, Recorder
from devtools.drills import Ctx, Drill, Result, Settings
from pkg.clients import BreakerPolicy, Policy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.devstack.servers import (
    CommandProcess,
    KafkaBroker,
    PostgresServer,
    RedisServer,
    free_port,
)
from pkg.events.kafka import KafkaSink
from pkg.events.signalman import SignalmanSink
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

log = structlog.get_logger("drills.rollout")
PY = sys.executable
PROBE_NODE = "edge-amsterdam-000"  # the node whose mode the operator sets
PROBE_MODE = ("DRAINING", "kernel upgrade")
SUBSCRIBERS = 4  # the drill's event subscribers, all following the subscribers' list
# Bridge's Signalman credentials, one per tenant (./dev up's).
BRIDGE_SIGNALMAN_TOKENS = ",".join(
    f"{t}={up.signalman_tenant_token(t)}" for t in ("demo", *up.EVENT_TENANTS)
)


class PortlessProcess(CommandProcess):
    def is_ready(self) -> bool:
        return self.running


@dataclass
class Replica:
    name: str
    proc: CommandProcess
    grpc: str
    http: str
    ports: tuple[int, int] = (0, 0)  # (gRPC, HTTP): a restart keeps its addresses
    redis_url: str = ""


@dataclass
class RolloutPlatform:
    """The processes of the drill, started and replaced as the procedure says."""

    run_dir: Path
    nodes: int
    redis: RedisServer | None = None
    kafka: KafkaBroker | None = None
    postgres: PostgresServer | None = None
    foghorn: dict[str, Replica] = field(default_factory=dict)
    signalman: dict[str, Replica] = field(default_factory=dict)
    bridges: dict[str, Replica] = field(default_factory=dict)
    bridge_ports: list[int] = field(default_factory=list)
    fleet: CommandProcess | None = None
    node_file: Path = Path()
    caller_file: Path = Path()
    subscriber_file: Path = Path()
    # Where Foghorn replicas send their events (FOGHORN_SIGNALMAN_* or FOGHORN_KAFKA_BOOTSTRAP):
    # what a replica started or restarted now is given.
    foghorn_events: dict[str, str] = field(default_factory=dict)
    # ./dev drill rollout --tls: every process serves TLS (mTLS between services, Bridge's public
    # side without client certificates, as ./dev up --tls), the stores included.
    tls: DevTls | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def tls_env(self, name: str, client_auth: str = "require") -> dict[str, str]:
        return self.tls.service_env(name, client_auth=client_auth) if self.tls else {}

    def start_redis(self) -> str:
        self.redis = RedisServer(
            run_dir=self.run_dir / "redis", tls=self.tls.cert("redis") if self.tls else None
        )
        self.redis.start()
        return self.redis.url

    def start_stores(self) -> None:
        """Kafka (tansu) and PostgreSQL for Phase 3."""
        tls = self.tls
        self.kafka = KafkaBroker(
            run_dir=self.run_dir / "tansu", tls=tls.cert("tansu") if tls else None
        )
        self.kafka.start()
        self.postgres = PostgresServer(
            run_dir=self.run_dir / "postgres", tls=tls.cert("postgres") if tls else None
        )
        self.postgres.start()

    def start_foghorn(
        self, name: str, redis_url: str = "", ports: tuple[int, int] | None = None
    ) -> Replica:
        grpc_port, http_port = ports or (free_port(), free_port())
        env = {
            "PLATFORM_TOKENS": up.PLATFORM_TOKENS,
            "FOGHORN_GRPC_PORT": str(grpc_port),
            "FOGHORN_HTTP_PORT": str(http_port),
            "FOGHORN_REPLICA_ID": name,
            "FOGHORN_REDIS_URL": redis_url,
            "FOGHORN_CLUSTER": "rollout",
            "FOGHORN_REPORT_INTERVAL_S": "2",
            **self.foghorn_events,
            **self.tls_env(name),
        }
        proc = CommandProcess(name, [PY, "-m", "api_balancing"],
                              run_dir=self.run_dir / f"{name}-{int(time.time() * 1000)}",
                              port=grpc_port, env=env, ready_timeout=60)  # fmt: skip
        proc.start()
        http = f"{self.scheme}://127.0.0.1:{http_port}"
        replica = Replica(name, proc, f"127.0.0.1:{grpc_port}", http, (grpc_port, http_port),
                          redis_url)  # fmt: skip
        self.foghorn[name] = replica
        return replica

    def restart_foghorn(self, name: str) -> None:
        """SIGTERM (a hand-over), then the same replica again with today's event settings."""
        old = self.foghorn[name]
        old.proc.stop(timeout=30)
        self.start_foghorn(name, old.redis_url, old.ports)

    def start_signalman(self, name: str, kafka: bool) -> Replica:
        """An embedded replica (no backend: events through Publish) or a Kafka one (all three
        settings of Phase 3)."""
        grpc_port, http_port = free_port(), free_port()
        env = {
            "PLATFORM_TOKENS": up.PLATFORM_TOKENS,
            "SIGNALMAN_GRPC_PORT": str(grpc_port),
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "SIGNALMAN_REPLICA_ID": name,
            **self.tls_env(name),
        }
        if kafka:
            assert self.kafka is not None and self.postgres is not None and self.redis is not None
            env |= {
                "SIGNALMAN_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
                "SIGNALMAN_TOPIC": up.EVENTS_TOPIC,
                "SIGNALMAN_REDIS_URL": self.redis.url,
                "SIGNALMAN_POSTGRES_DSN": self.postgres.dsn,
                # The dev stack's tansu settings (./dev up, docs/signalman.md): 1 s joins.
                "SIGNALMAN_SESSION_TIMEOUT_MS": "2000",
                "SIGNALMAN_HEARTBEAT_INTERVAL_MS": "200",
            }
        proc = CommandProcess(name, [PY, "-m", "api_realtime"], run_dir=self.run_dir / name,
                              port=grpc_port, env=env, ready_timeout=60)  # fmt: skip
        proc.start()
        http = f"{self.scheme}://127.0.0.1:{http_port}"
        replica = Replica(name, proc, f"127.0.0.1:{grpc_port}", http, (grpc_port, http_port))
        self.signalman[name] = replica
        return replica

    def start_bridge(self, index: int, redis_url: str = "") -> Replica:
        name = f"bridge-{index}"
        port = self.bridge_ports[index]
        env = {
            "PLATFORM_TOKENS": up.PLATFORM_TOKENS,
            "BRIDGE_REPLICA_ID": name,
            "BRIDGE_REDIS_URL": redis_url,
            "BRIDGE_FOGHORN_ADDRESSES": f"file:{self.caller_file}",
            "BRIDGE_FOGHORN_TOKEN": up.BRIDGE_FOGHORN_TOKEN,
            "BRIDGE_JWT_HS256_SECRET": up.BRIDGE_JWT_SECRET,
            "BRIDGE_SIGNALMAN_ADDRESSES": f"file:{self.subscriber_file}",
            "BRIDGE_SIGNALMAN_TOKENS": BRIDGE_SIGNALMAN_TOKENS,
            **self.tls_env(name, client_auth="none"),
        }
        proc = CommandProcess(
            name, [PY, "-m", "api_gateway", "--port", str(port), "--id", name],
            run_dir=self.run_dir / f"{name}-{int(time.time() * 1000)}", port=port, env=env,
            ready_timeout=60,
        )  # fmt: skip
        proc.start()
        replica = Replica(name, proc, "", f"{self.scheme}://127.0.0.1:{port}")
        self.bridges[name] = replica
        return replica

    def write_node_file(self, names: list[str]) -> None:
        _write_list(self.node_file, [self.foghorn[n].grpc for n in names])

    def write_caller_file(self, names: list[str]) -> None:
        """The callers' replica list (direct callers and Bridge watch it: no restart)."""
        _write_list(self.caller_file, [self.foghorn[n].grpc for n in names])

    def write_subscriber_file(self, names: list[str]) -> None:
        """The subscribers' Signalman list (the drill's subscribers and Bridge watch it)."""
        _write_list(self.subscriber_file, [self.signalman[n].grpc for n in names])

    def start_fleet(self, names: list[str]) -> None:
        self.node_file = self.run_dir / "foghorn-replicas.txt"
        self.write_node_file(names)
        self.fleet = PortlessProcess(
            "edge-sim",
            [PY, "-m", "api_balancing.simulator", "--foghorn-file", str(self.node_file),
             "--nodes", str(self.nodes), "--token", up.NODE_TOKEN, "--interval", "2"],
            run_dir=self.run_dir / "edge-sim",
            env=self.tls.tool_env("nodes") if self.tls else None,
        )  # fmt: skip
        self.fleet.start()

    def stop(self) -> None:
        procs = [self.fleet, *(r.proc for r in self.bridges.values()),
                 *(r.proc for r in self.foghorn.values()),
                 *(r.proc for r in self.signalman.values()),
                 self.kafka, self.postgres, self.redis]  # fmt: skip
        for proc in procs:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop(timeout=15)


class Checks:
    """Health documents (operator credential: the full one) and the operator's mode."""

    def __init__(self) -> None:
        policy = replace(Policy.no_retries(timeout=2.0), breaker=BreakerPolicy(enabled=False))
        self.http = AsyncHttpClient(policy=policy, verify=http_verify())
        self.headers = {"authorization": f"Bearer {up.OPERATOR_TOKEN}"}

    async def health(self, replica: Replica) -> dict[str, Any]:
        try:
            reply = await self.http.get(f"{replica.http}/health", headers=self.headers)
            doc = reply.json()
            return doc if isinstance(doc, dict) else {}
        except Exception:
            return {}

    async def streams(self, replica: Replica) -> int:
        doc = await self.health(replica)
        return int((doc.get("counts") or {}).get("local_streams", -1))

    async def wait(self, what: str, check: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"not within {timeout_s:g} s: {what}")

    async def routings(self, replica: Replica) -> float | None:
        """The replica's ``foghorn_routing_decisions_total`` (None: not readable)."""
        try:
            reply = await self.http.get(f"{replica.http}/metrics", headers=self.headers)
        except Exception:
            return None
        total = 0.0
        for line in reply.text.splitlines():
            if line.startswith("foghorn_routing_decisions_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def unused(self, *replicas: Replica, quiet_s: float = 1.5) -> dict[str, float]:
        """Wait until no caller routes to ``replicas`` any more: their routing counters stay
        flat for ``quiet_s`` (what an operator checks on /metrics before retiring one).
        Returns each one's final count (an unreadable counter never counts as flat)."""

        async def counts() -> list[float | None]:
            return [await self.routings(r) for r in replicas]

        last, since = await counts(), time.monotonic()
        deadline = since + 30.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = await counts()
            if now != last or None in now:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return {r.name: float(c or 0.0) for r, c in zip(replicas, now, strict=True)}
        names = ", ".join(r.name for r in replicas)
        raise RuntimeError(f"callers still route to {names} 30 s after the list changed")

    async def mode(self, replica: Replica) -> tuple[str, str] | None:
        try:
            async with FoghornClient(
                replica.grpc, token=up.OPERATOR_TOKEN, credentials=grpc_credentials()
            ) as client:
                node = await client.get_node(PROBE_NODE)
        except Exception:
            return None
        return pb.NodeMode.Name(node.mode).removeprefix("NODE_MODE_"), node.mode_reason

    async def close(self) -> None:
        await self.http.aclose()


class Callers:
    """Viewer routing straight to Foghorn and through Bridge, both following ``caller_file``."""

    def __init__(self, caller_file: Path, bridges: list[str], jwt: str) -> None:
        self.foghorn_rec, self.bridge_rec = Recorder("foghorn"), Recorder("bridge")
        self.direct = FoghornViewers([f"file:{caller_file}"], 15.0)
        self.direct.recorder = self.foghorn_rec
        self.direct.start()
        self.through = BridgeViewers([f"{u}/graphql" for u in bridges], jwt, 8.0)
        self.through.recorder = self.bridge_rec
        self.through.start()

    async def close(self) -> None:
        for viewers in (self.direct, self.through):
            await viewers.stop()
            await viewers.close()


def _signalman_sink(replica: Replica) -> SignalmanSink:
    """The path of events on the embedded platform: the replica's Publish RPC (Foghorn's
    ``FOGHORN_SIGNALMAN_ADDRESSES`` with its `system` credential)."""
    return SignalmanSink(
        [replica.grpc], up.SYSTEM_TOKEN, source="drill", credentials=grpc_credentials()
    )


def _count_events(flow: EventFlow, since: float, until: float) -> dict[str, Any]:
    """Events produced in [since, until): lost and duplicated (summed over subscribers, as
    counted now) and the slowest first delivery."""
    ids = [eid for eid, t in flow.produced.items() if since <= t < until]
    lost = dup = 0
    slowest = 0.0
    for sub in flow.subscribers:
        for eid in ids:
            times = sub.received.get(eid)
            if not times:
                lost += 1
                continue
            dup += len(times) - 1
            slowest = max(slowest, times[0] - flow.produced[eid])
    return {"events": len(ids), "lost": lost, "duplicated": dup,
            "max_event_delay_s": round(slowest, 2)}  # fmt: skip


async def run_rollout(
    nodes: int, run_dir: Path, platform: RolloutPlatform | None = None, event_rate: float = 20.0
) -> dict[str, Any]:
    """The whole drill; returns its facts (``steps``, ``state_kept``, counts). A caller that
    passes ``platform`` can also stop its processes itself when the drill is interrupted."""
    p = platform or RolloutPlatform(run_dir, nodes)
    checks = Checks()
    steps: list[dict[str, Any]] = []
    # Routing decisions each replica made before the callers left it (all > 0: they used it).
    retired: dict[str, float] = {}
    facts: dict[str, Any] = {"steps": steps, "routings_before_retired": retired}
    state_ok: list[bool] = []
    callers: Callers | None = None
    flow: EventFlow | None = None
    phase3_on: float | None = None  # when events first went to Kafka
    windows: list[tuple[float, float]] = []
    stores: asyncio.Task[None] | None = None

    async def modes_kept() -> bool:
        """Every replica that holds a record of the node has the operator's mode (a replica
        just started beside the others holds none until the node reaches it), and one does."""
        seen = [await checks.mode(r) for r in p.foghorn.values() if r.proc.running]
        known = [m for m in seen if m is not None]
        return bool(known) and all(m == PROBE_MODE for m in known)

    async def step(what: str, action: Any) -> None:
        assert callers is not None
        started = time.monotonic()
        log.info("rollout step", step=what)
        did = await action()
        ended = time.monotonic()
        kept = await modes_kept()
        state_ok.append(kept)
        f = callers.foghorn_rec.between(started, ended)
        b = callers.bridge_rec.between(started, ended)
        windows.append((started, ended))
        steps.append({
            "step": what, "took_s": round(ended - started, 2), "state_kept": kept,
            "requests": len(f) + len(b), "failed_foghorn": sum(1 for s in f if not s.ok),
            "failed_bridge": sum(1 for s in b if not s.ok),
            "errors": sorted({s.error for s in [*f, *b] if not s.ok})[:3],
            **(did or {}),
        })  # fmt: skip

    async def all_nodes_on(*names: str) -> bool:
        counts = [await checks.streams(p.foghorn[n]) for n in names]
        return sum(counts) == nodes

    async def bridges_ok() -> bool:
        docs = [await checks.health(r) for r in p.bridges.values()]
        return all(d.get("status") == "ok" for d in docs)

    async def roll_bridges(redis_url: str) -> None:
        for i in range(len(p.bridge_ports)):
            old = p.bridges[f"bridge-{i}"]
            await asyncio.to_thread(old.proc.stop, 30)
            await asyncio.to_thread(p.start_bridge, i, redis_url)
            await checks.wait("bridge healthy", bridges_ok)

    async def foghorn_ready() -> bool:
        """Every replica ok and seeing the whole fleet (the RFC's 'healthy again')."""
        for replica in p.foghorn.values():
            doc = await checks.health(replica)
            if doc.get("status") != "ok" or (doc.get("figures") or {}).get("nodes") != nodes:
                return False
        return True

    async def roll_foghorn(events: dict[str, str], switch: Any) -> dict[str, Any]:
        """Phase 3's rolling restart of Foghorn onto ``events``; ``switch`` moves the drill's
        probe events along once the first replica publishes on the new path."""
        p.foghorn_events = events
        names = list(p.foghorn)
        for i, name in enumerate(names):
            await asyncio.to_thread(p.restart_foghorn, name)
            await checks.wait(f"{name} healthy again", foghorn_ready)
            if i == 0:
                await switch()
        owned = [int(((await checks.health(p.foghorn[n])).get("ha") or {})
                     .get("owned_nodes", -1)) for n in names]  # fmt: skip
        return {"restarted": names, "nodes_owned": owned}

    async def partitions(name: str) -> list[list[Any]]:
        parts = (await checks.health(p.signalman[name])).get("partitions") or []
        return [x for x in parts if isinstance(x, list)]

    async def group_owns_all(*names: str, lag_zero: bool = False) -> bool:
        """Every partition owned by one of ``names``, each of them owning some (all in the
        group), and (``lag_zero``) nothing left unprocessed."""
        owned = [await partitions(n) for n in names]
        if not all(owned):
            return False
        flat = [x for parts in owned for x in parts]
        if sorted(int(x[1]) for x in flat) != list(range(up.EVENTS_PARTITIONS)):
            return False
        return not lag_zero or all(int(x[3]) == 0 for x in flat)

    async def subscribers_on(*names: str) -> bool:
        docs = [await checks.health(p.signalman[n]) for n in names]
        return sum(int(d.get("subscribers", 0) or 0) for d in docs) >= SUBSCRIBERS

    async def move(source: str, target: str) -> None:
        async with FoghornClient(
            p.foghorn[source].grpc, token=up.OPERATOR_TOKEN, credentials=grpc_credentials()
        ) as client:
            await client.admin.MoveNodes(
                pb.MoveNodesRequest(targets=[p.foghorn[target].grpc]), timeout=10.0
            )

    try:
        # -- the embedded default -------------------------------------------------------------
        p.bridge_ports = [free_port(), free_port()]
        p.subscriber_file = run_dir / "callers-signalman.txt"
        embedded = await asyncio.to_thread(p.start_signalman, "signalman-e", False)
        p.write_subscriber_file(["signalman-e"])
        p.foghorn_events = {
            "FOGHORN_SIGNALMAN_ADDRESSES": embedded.grpc,
            "FOGHORN_SIGNALMAN_TOKEN": up.SYSTEM_TOKEN,
        }
        await asyncio.to_thread(p.start_foghorn, "foghorn-m")
        p.start_fleet(["foghorn-m"])
        p.caller_file = run_dir / "callers-foghorn.txt"
        p.write_caller_file(["foghorn-m"])
        for i in range(2):
            await asyncio.to_thread(p.start_bridge, i)
        await checks.wait("fleet on foghorn-m", lambda: all_nodes_on("foghorn-m"))
        await checks.wait("bridges healthy", bridges_ok)
        async with FoghornClient(
            p.foghorn["foghorn-m"].grpc, token=up.OPERATOR_TOKEN, credentials=grpc_credentials()
        ) as ops:
            await ops.set_mode(PROBE_NODE, "draining", reason=PROBE_MODE[1], ack_timeout_s=5.0)
        callers = Callers(p.caller_file, [r.http for r in p.bridges.values()],
                          drills._bridge_jwt())  # fmt: skip
        flow = EventFlow("", up.EVENTS_TOPIC, drills.EVENT_TENANT, [f"file:{p.subscriber_file}"],
                         up.SIGNALMAN_DEMO_TOKEN, event_rate, sink=_signalman_sink(embedded),
                         subscribers=SUBSCRIBERS)  # fmt: skip
        await flow.start()
        # Phase 3's stores start now, beside the earlier phases (their start is not a step).
        stores = asyncio.create_task(asyncio.to_thread(p.start_stores))
        await asyncio.sleep(3.0)  # traffic before the first step
        redis_url = await asyncio.to_thread(p.start_redis)

        # -- Phase 1 rollout ------------------------------------------------------------------
        async def s2() -> None:
            await asyncio.to_thread(p.start_foghorn, "foghorn-h1", redis_url)
            await checks.wait("h1 healthy",
                              lambda: _ok(checks, p.foghorn["foghorn-h1"]))  # fmt: skip

        async def s3() -> None:
            p.write_node_file(["foghorn-m", "foghorn-h1"])
            await asyncio.sleep(1.5)  # the fleet re-reads its file every second

        async def s4() -> None:
            await move("foghorn-m", "foghorn-h1")
            await checks.wait("fleet on h1", lambda: all_nodes_on("foghorn-h1"))

        async def s5() -> None:
            p.write_caller_file(["foghorn-h1"])
            retired.update(await checks.unused(p.foghorn["foghorn-m"]))

        async def s6() -> None:
            await asyncio.to_thread(p.foghorn.pop("foghorn-m").proc.stop, 30)
            p.write_node_file(["foghorn-h1"])

        async def s7() -> None:
            await asyncio.to_thread(p.start_foghorn, "foghorn-h2", redis_url)
            await checks.wait("even split", lambda: _even(checks, p, nodes))
            p.write_node_file(["foghorn-h1", "foghorn-h2"])
            p.write_caller_file(["foghorn-h1", "foghorn-h2"])
            await asyncio.sleep(1.5)  # both lists are re-read every second

        await step("P1.2 start HA replica h1 beside the in-memory m", s2)
        await step("P1.3 tell the nodes of h1 (their replica file)", s3)
        await step("P1.4 move-nodes m -> h1 (modes travel with the nodes)", s4)
        await step("P1.5 callers' list to h1 (no restart), until m routes nothing", s5)
        await step("P1.6 SIGTERM m, drop it from the nodes' file", s6)
        await step("P1.7 add h2 (rebalanced), callers' list and nodes' file to h1,h2", s7)
        # -- Phase 2 rollout ------------------------------------------------------------------
        await step("P2 Bridge rolling restart with BRIDGE_REDIS_URL",
                   lambda: roll_bridges(redis_url))  # fmt: skip

        # -- Phase 3 rollout ------------------------------------------------------------------
        async def t1() -> dict[str, Any]:
            assert stores is not None
            await stores  # deployed beside the earlier phases
            assert p.kafka is not None
            await up.create_topic(p.kafka.bootstrap, up.EVENTS_TOPIC, up.EVENTS_PARTITIONS)
            return {"topic_partitions": up.EVENTS_PARTITIONS}

        async def t2() -> dict[str, Any]:
            for name in ("signalman-k1", "signalman-k2"):
                await asyncio.to_thread(p.start_signalman, name, True)
            await checks.wait("K1 and K2 own every partition",
                              lambda: group_owns_all("signalman-k1", "signalman-k2"))  # fmt: skip
            return {"partitions": {n: [int(x[1]) for x in await partitions(n)]
                                   for n in ("signalman-k1", "signalman-k2")}}  # fmt: skip

        async def to_kafka() -> None:
            nonlocal phase3_on
            assert flow is not None and p.kafka is not None
            phase3_on = time.monotonic()
            await flow.switch_sink(KafkaSink(p.kafka.bootstrap, topic=up.EVENTS_TOPIC,
                                             source="drill"))  # fmt: skip

        async def t3() -> dict[str, Any]:
            assert p.kafka is not None
            return await roll_foghorn(
                {**p.foghorn_events, "FOGHORN_KAFKA_BOOTSTRAP": p.kafka.bootstrap}, to_kafka
            )

        async def t4() -> None:
            p.write_subscriber_file(["signalman-k1", "signalman-k2"])
            await asyncio.sleep(1.5)  # a file list is re-read every second

        async def t5() -> None:
            await asyncio.to_thread(p.signalman.pop("signalman-e").proc.stop, 30)
            await checks.wait("subscribers on K1, K2",
                              lambda: subscribers_on("signalman-k1", "signalman-k2"))  # fmt: skip

        await step("P3.1 Kafka and PostgreSQL deployed, topic created", t1)
        await step("P3.2 start Kafka replicas K1, K2 beside the embedded E", t2)
        await step("P3.3 Foghorn rolling restart with FOGHORN_KAFKA_BOOTSTRAP", t3)
        await step("P3.4 subscribers' list (and Bridge's) to K1,K2 (no restart)", t4)
        await step("P3.5 SIGTERM E: its subscribers resume on K1/K2", t5)

        # -- Phase 3 rollback -----------------------------------------------------------------
        async def u1() -> None:
            await asyncio.to_thread(p.start_signalman, "signalman-e2", False)

        async def to_publish() -> None:
            assert flow is not None
            await flow.switch_sink(_signalman_sink(p.signalman["signalman-e2"]))

        async def u2() -> dict[str, Any]:
            events = {
                "FOGHORN_SIGNALMAN_ADDRESSES": p.signalman["signalman-e2"].grpc,
                "FOGHORN_SIGNALMAN_TOKEN": up.SYSTEM_TOKEN,
            }
            return await roll_foghorn(events, to_publish)

        async def u3() -> None:
            p.write_subscriber_file(["signalman-e2"])
            await asyncio.sleep(1.5)

        async def u4() -> None:
            await checks.wait("K1, K2 processed everything",
                              lambda: group_owns_all("signalman-k1", "signalman-k2",
                                                     lag_zero=True))  # fmt: skip
            await asyncio.to_thread(p.signalman.pop("signalman-k1").proc.stop, 30)
            await checks.wait("K2 owns every partition, processed everything",
                              lambda: group_owns_all("signalman-k2", lag_zero=True))  # fmt: skip
            await asyncio.to_thread(p.signalman.pop("signalman-k2").proc.stop, 30)
            await checks.wait("subscribers on E2", lambda: subscribers_on("signalman-e2"))

        await step("P3 rollback.1 start an embedded replica E2 beside", u1)
        await step("P3 rollback.2 Foghorn rolling restart onto E2's Publish RPC", u2)
        await step("P3 rollback.3 subscribers' list (and Bridge's) to E2 (no restart)", u3)
        await step("P3 rollback.4 SIGTERM K1, then K2 once it owns everything, lag 0", u4)

        # -- Phase 2 and 1 rollback -----------------------------------------------------------
        await step("P2 rollback: Bridge rolling restart without BRIDGE_REDIS_URL",
                   lambda: roll_bridges(""))  # fmt: skip

        async def r1() -> None:
            await asyncio.to_thread(p.start_foghorn, "foghorn-m2")
            p.write_node_file(["foghorn-h1", "foghorn-h2", "foghorn-m2"])
            await asyncio.sleep(1.5)

        async def r2() -> None:
            await move("foghorn-h1", "foghorn-m2")
            await move("foghorn-h2", "foghorn-m2")
            await checks.wait("fleet on m2", lambda: all_nodes_on("foghorn-m2"))

        async def r3() -> None:
            p.write_caller_file(["foghorn-m2"])
            retired.update(await checks.unused(p.foghorn["foghorn-h1"], p.foghorn["foghorn-h2"]))

        async def r4() -> None:
            for name in ("foghorn-h1", "foghorn-h2"):
                await asyncio.to_thread(p.foghorn.pop(name).proc.stop, 30)
            p.write_node_file(["foghorn-m2"])

        await step("P1 rollback.1 start in-memory m2 beside, tell the nodes", r1)
        await step("P1 rollback.2 move-nodes h1 -> m2, h2 -> m2", r2)
        await step("P1 rollback.3 callers' list to m2 (no restart), until h1, h2 route nothing",
                   r3)  # fmt: skip
        await step("P1 rollback.4 SIGTERM h1, h2", r4)
        await asyncio.sleep(2.0)
    except Exception as exc:
        log.exception("rollout drill stopped")
        facts["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if callers is not None:
            await callers.close()
            facts["requests"] = len(callers.foghorn_rec.samples) + len(callers.bridge_rec.samples)
            facts["failed_foghorn"] = len(callers.foghorn_rec.failures())
            facts["failed_bridge"] = len(callers.bridge_rec.failures())
        if flow is not None:
            await flow.stop_producing()
            await flow.drain(10.0)
            _event_facts(facts, flow, phase3_on, windows)
            await flow.close()
        if stores is not None:
            with contextlib.suppress(Exception):
                await stores
        await checks.close()
        await asyncio.to_thread(p.stop)
    facts["state_kept"] = bool(state_ok) and all(state_ok)
    return facts


def _event_facts(
    facts: dict[str, Any],
    flow: EventFlow,
    phase3_on: float | None,
    windows: list[tuple[float, float]],
) -> None:
    """Per step and overall: the events produced, lost and duplicated, now that every
    subscriber had its chance to receive them."""
    for row, (since, until) in zip(facts["steps"], windows, strict=True):
        row["events"] = _count_events(flow, since, until)
    end = float("inf")
    facts["events_produced"] = len(flow.produced)
    facts["phase3_on"] = phase3_on is not None
    on = _count_events(flow, phase3_on, end) if phase3_on is not None else None
    facts["since_phase3"] = on
    facts["before_phase3"] = _count_events(flow, 0.0, phase3_on or end)
    facts["history_gaps"] = sum(s.gaps for s in flow.subscribers)
    facts["subscribers"] = {
        s.name: {
            "received": len(s.received),
            "gaps": s.gaps,
            "ended_with": s.error,
            "replicas": list(s.sub.stats.replicas) if s.sub is not None else [],
        }
        for s in flow.subscribers
    }


def _write_list(path: Path, addresses: list[str]) -> None:
    """Replace a replica list at once (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(addresses) + "\n")
    tmp.replace(path)


async def _ok(checks: Checks, replica: Replica) -> bool:
    return (await checks.health(replica)).get("status") == "ok"


async def _even(checks: Checks, p: RolloutPlatform, nodes: int) -> bool:
    owned = []
    for name in ("foghorn-h1", "foghorn-h2"):
        ha = (await checks.health(p.foghorn[name])).get("ha") or {}
        owned.append(int(ha.get("owned_nodes", -1)))
    return sum(owned) == nodes and max(owned) - min(owned) <= 1


async def rollout_drill(settings: Settings, run_dir: Path) -> Result:
    """``rollout`` as a drill row: it runs on a platform of its own (it starts embedded)."""
    result = Result("rollout", ROLLOUT.expected)
    await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
    platform = None
    if settings.tls:
        tls = DevTls(run_dir)
        tls.enable_for_this_process()  # the harness's checks and viewers: its certificate
        platform = RolloutPlatform(run_dir, settings.nodes, tls=tls)
    facts = await run_rollout(settings.nodes, run_dir, platform, event_rate=settings.event_rate)
    result.facts = facts
    result.failed_foghorn = int(facts.get("failed_foghorn", 0))
    result.failed_bridge = int(facts.get("failed_bridge", 0))
    result.failed_requests = result.failed_foghorn + result.failed_bridge
    result.requests = int(facts.get("requests", 0))
    since = facts.get("since_phase3") or {}
    result.events_produced = int(since.get("events", 0))
    result.lost_events = int(since.get("lost", 0))
    result.duplicate_events = int(since.get("duplicated", 0))
    result.history_gaps = int(facts.get("history_gaps", 0))
    if "error" in facts:
        result.problems.append(f"drill did not run to the end: {facts['error']}")
    if result.failed_requests:
        result.problems.append(f"{result.failed_requests} failed routings (expected 0)")
    if not facts.get("state_kept"):
        result.problems.append("operator state not kept at every step")
    if not facts.get("phase3_on") or not result.events_produced:
        result.problems.append("no event went through Kafka: Phase 3 was never on")
    if result.lost_events or result.duplicate_events:
        result.problems.append(
            f"{result.lost_events} lost, {result.duplicate_events} duplicated events since "
            "Phase 3 was on (expected 0)"
        )
    unused = [n for n, c in facts.get("routings_before_retired", {}).items() if not c > 0]
    if unused:  # the callers never followed the list to them: the drill proved nothing there
        result.problems.append(f"callers never routed to {', '.join(unused)} before retiring it")
    result.ok = not result.problems
    return result


async def _no_fault(_ctx: Ctx) -> None:
    return None


def _no_check(_ctx: Ctx, _r: Result) -> list[str]:
    return []


ROLLOUT = Drill(
    "rollout",
    "from the embedded default to HA and back following the scaling RFC's Phase 1, 2 and 3 "
    "procedures as written, under traffic: 0 failed routings, the operator's node mode kept "
    "at every step (state_kept: true), 0 lost and 0 duplicated events once Phase 3 is on",
    _no_fault,
    None,
    "-",
    _no_check,
    alone=rollout_drill,
)
drills.DRILLS.append(ROLLOUT)
drills.BY_NAME[ROLLOUT.name] = ROLLOUT
