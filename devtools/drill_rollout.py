"""The ``rollout`` drill: the scaling RFC's phases rolled out and back, as written, under traffic.

It starts from the embedded default (one in-memory Foghorn, Bridge replicas in memory, an edge
fleet that watches its replica file), sets a node's mode as an operator would, then follows
``docs/rfcs/horizontal-scaling.md`` step by step: Phase 1 (the HA replica beside the in-memory
one, the nodes told of it and moved with ``move-nodes``, callers moved, the old replica retired,
a second HA replica added and filled by rebalancing) and Phase 2 (Bridge onto Redis, a rolling
restart), then the rollback of both in reverse. Viewer routing runs straight to Foghorn and
through Bridge the whole time. Callers are never restarted to follow a step: the direct callers
(``pkg.clients.foghorn``) and Bridge (``BRIDGE_FOGHORN_ADDRESSES``) take their Foghorn replicas
from one watched list, ``file:<run dir>/callers-foghorn.txt``, which a step edits as the RFC
says (the same as changing the records of a ``dns:///`` name); a replica is retired only once
the callers stopped routing to it (its ``foghorn_routing_decisions_total`` stays flat).

Each step is a row of ``facts.steps``: what it did, how long it took, its own failed/total
routings. ``facts.state_kept`` is true when after every step every Foghorn replica holding a
record of the node reported the operator's mode and reason (and at least one held one).

Not in this drill (yet): Phase 3 (Signalman moved onto Kafka, which needs Foghorn's events
switched and subscribers moved): Signalman runs embedded throughout, so no events are counted.
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
from devtools.drill_traffic import BridgeViewers, FoghornViewers, Recorder
from devtools.drills import Ctx, Drill, Result, Settings
from pkg.clients import BreakerPolicy, Policy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.devstack.servers import CommandProcess, RedisServer, free_port
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

log = structlog.get_logger("drills.rollout")
PY = sys.executable
PROBE_NODE = "edge-amsterdam-000"  # the node whose mode the operator sets
PROBE_MODE = ("DRAINING", "kernel upgrade")


class PortlessProcess(CommandProcess):
    def is_ready(self) -> bool:
        return self.running


@dataclass
class Replica:
    name: str
    proc: CommandProcess
    grpc: str
    http: str


@dataclass
class RolloutPlatform:
    """The processes of the drill, started and replaced as the procedure says."""

    run_dir: Path
    nodes: int
    redis: RedisServer | None = None
    foghorn: dict[str, Replica] = field(default_factory=dict)
    bridges: dict[str, Replica] = field(default_factory=dict)
    bridge_ports: list[int] = field(default_factory=list)
    fleet: CommandProcess | None = None
    node_file: Path = Path()
    caller_file: Path = Path()
    # ./dev drill rollout --tls: every process serves TLS (mTLS between services, Bridge's public
    # side without client certificates, as ./dev up --tls), Redis included.
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

    def start_foghorn(self, name: str, redis_url: str = "") -> Replica:
        grpc_port, http_port = free_port(), free_port()
        env = {
            "PLATFORM_TOKENS": up.PLATFORM_TOKENS,
            "FOGHORN_GRPC_PORT": str(grpc_port),
            "FOGHORN_HTTP_PORT": str(http_port),
            "FOGHORN_REPLICA_ID": name,
            "FOGHORN_REDIS_URL": redis_url,
            "FOGHORN_CLUSTER": "rollout",
            "FOGHORN_REPORT_INTERVAL_S": "2",
            **self.tls_env(name),
        }
        proc = CommandProcess(name, [PY, "-m", "api_balancing"], run_dir=self.run_dir / name,
                              port=grpc_port, env=env, ready_timeout=60)  # fmt: skip
        proc.start()
        http = f"{self.scheme}://127.0.0.1:{http_port}"
        replica = Replica(name, proc, f"127.0.0.1:{grpc_port}", http)
        self.foghorn[name] = replica
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
                 *(r.proc for r in self.foghorn.values()), self.redis]  # fmt: skip
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


async def run_rollout(
    nodes: int, run_dir: Path, platform: RolloutPlatform | None = None
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
        await action()
        ended = time.monotonic()
        kept = await modes_kept()
        state_ok.append(kept)
        f = callers.foghorn_rec.between(started, ended)
        b = callers.bridge_rec.between(started, ended)
        steps.append({
            "step": what, "took_s": round(ended - started, 2), "state_kept": kept,
            "requests": len(f) + len(b), "failed_foghorn": sum(1 for s in f if not s.ok),
            "failed_bridge": sum(1 for s in b if not s.ok),
            "errors": sorted({s.error for s in [*f, *b] if not s.ok})[:3],
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

    async def move(source: str, target: str) -> None:
        async with FoghornClient(p.foghorn[source].grpc, token=up.OPERATOR_TOKEN) as client:
            await client.admin.MoveNodes(
                pb.MoveNodesRequest(targets=[p.foghorn[target].grpc]), timeout=10.0
            )

    try:
        # -- the embedded default -------------------------------------------------------------
        p.bridge_ports = [free_port(), free_port()]
        await asyncio.to_thread(p.start_foghorn, "foghorn-m")
        p.start_fleet(["foghorn-m"])
        p.caller_file = run_dir / "callers-foghorn.txt"
        p.write_caller_file(["foghorn-m"])
        for i in range(2):
            await asyncio.to_thread(p.start_bridge, i)
        await checks.wait("fleet on foghorn-m", lambda: all_nodes_on("foghorn-m"))
        await checks.wait("bridges healthy", bridges_ok)
        async with FoghornClient(p.foghorn["foghorn-m"].grpc, token=up.OPERATOR_TOKEN) as ops:
            await ops.set_mode(PROBE_NODE, "draining", reason=PROBE_MODE[1], ack_timeout_s=5.0)
        callers = Callers(p.caller_file, [r.http for r in p.bridges.values()],
                          drills._bridge_jwt())  # fmt: skip
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
        # -- rollback, in reverse -------------------------------------------------------------
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
        await checks.close()
        await asyncio.to_thread(p.stop)
    facts["state_kept"] = bool(state_ok) and all(state_ok)
    return facts


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
    facts = await run_rollout(settings.nodes, run_dir, platform)
    result.facts = facts
    result.failed_foghorn = int(facts.get("failed_foghorn", 0))
    result.failed_bridge = int(facts.get("failed_bridge", 0))
    result.failed_requests = result.failed_foghorn + result.failed_bridge
    result.requests = int(facts.get("requests", 0))
    if "error" in facts:
        result.problems.append(f"drill did not run to the end: {facts['error']}")
    if result.failed_requests:
        result.problems.append(f"{result.failed_requests} failed routings (expected 0)")
    if not facts.get("state_kept"):
        result.problems.append("operator state not kept at every step")
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
    "from the embedded default to HA and back following the scaling RFC's Phase 1 and 2 "
    "procedures as written, under traffic: 0 failed routings, the operator's node mode kept "
    "at every step (state_kept: true)",
    _no_fault,
    None,
    "-",
    _no_check,
    alone=rollout_drill,
)
drills.DRILLS.append(ROLLOUT)
drills.BY_NAME[ROLLOUT.name] = ROLLOUT
