"""Foghorn HA with real processes: replicas (``python -m api_balancing``), a real edge-sim
fleet, a real redis-server; replicas are killed (-9), paused (SIGSTOP) and restarted by pid."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.coord import LeaseState, OwnerRecord
from pkg.devstack.servers import CommandProcess, free_port
from tests.foghorn.conftest import NodeStream, register_msg, report_msg
from tests.foghorn_ha.conftest import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]

TOKEN = "ha-secret"
NODES = 12
PY = sys.executable


@dataclass
class Replica:
    name: str
    proc: CommandProcess
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proc.port}"


@dataclass
class Cluster:
    """N Foghorn replica processes on one Redis, plus helpers to look inside."""

    name: str
    redis_url: str
    factory: Callable[..., CommandProcess]
    env: dict[str, str]
    replicas: list[Replica] = field(default_factory=list)
    redis: aioredis.Redis | None = None
    http: AsyncHttpClient | None = None
    clients: list[FoghornClient] = field(default_factory=list)

    def start_replica(self, name: str) -> Replica:
        http_port = free_port()
        proc = self.factory(
            f"foghorn-{name}",
            [PY, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port", str(http_port)],
            env={**self.env, "FOGHORN_REPLICA_ID": name},
        )
        replica = Replica(name, proc, http_port)
        self.replicas.append(replica)
        return replica

    def start_fleet(self, nodes: int = NODES, interval: float = 0.3) -> CommandProcess:
        targets = ",".join(r.target for r in self.replicas)
        return self.factory(
            "edge-sim",
            [PY, "-m", "api_balancing.simulator", "--foghorn", targets, "--nodes", str(nodes),
             "--token", TOKEN, "--interval", str(interval), "--status-every", "0"],
            ready_port=self.replicas[0].proc.port,
        )  # fmt: skip

    def client(self, *replicas: Replica) -> FoghornClient:
        targets = [r.target for r in (replicas or self.replicas)]
        client = FoghornClient(targets, token=TOKEN, policy=Policy(timeout=5.0))
        self.clients.append(client)
        return client

    async def owners(self) -> dict[str, OwnerRecord]:
        """Ownership records in Redis ({} while Redis is unreachable)."""
        assert self.redis is not None
        prefix = f"foghorn:{{{self.name}}}:owner:"
        out = {}
        try:
            async for key in self.redis.scan_iter(match=prefix + "*"):
                raw = await self.redis.get(key)
                if raw is not None:
                    out[key[len(prefix) :]] = OwnerRecord.decode(raw)
        except (aioredis.ConnectionError, OSError):
            return {}
        return out

    async def leader(self) -> LeaseState | None:
        assert self.redis is not None
        raw = await self.redis.get(f"foghorn:{{{self.name}}}:leader")
        return LeaseState.decode(raw) if raw else None

    async def health(self, replica: Replica) -> dict[str, Any]:
        assert self.http is not None
        reply = await self.http.get(f"http://127.0.0.1:{replica.http_port}/health", timeout=3.0)
        doc: dict[str, Any] = reply.json()
        return doc


@pytest.fixture
async def make_cluster(
    redis_server: Any, process_factory: Callable[..., CommandProcess]
) -> AsyncIterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(redis_url: str | None = None, **env: str) -> Cluster:
        name = f"p{uuid.uuid4().hex[:8]}"
        url = redis_url or redis_server.url
        cluster = Cluster(
            name=name,
            redis_url=url,
            factory=process_factory,
            env={
                "PLATFORM_TOKENS": f"{TOKEN}=ops:operator|node;nodes=*;tenants=*,"
                "ha-relay=relay:replica",
                "FOGHORN_REDIS_URL": url,
                "FOGHORN_CLUSTER": name,
                "FOGHORN_OWNERSHIP_TTL_S": "2",
                "FOGHORN_LEASE_TTL_S": "2",
                "FOGHORN_LEASE_RENEW_S": "0.5",
                "FOGHORN_SYNC_BLOCK_MS": "200",
                "FOGHORN_REDIS_TIMEOUT_S": "1",
                "FOGHORN_REAP_INTERVAL_S": "0.5",
                "FOGHORN_REPORT_INTERVAL_S": "0.3",
                "LOG_LEVEL": "INFO",
                **env,
            },
        )
        cluster.redis = aioredis.Redis.from_url(url, decode_responses=True)
        cluster.http = AsyncHttpClient(policy=Policy(timeout=3.0), token=TOKEN)  # operator
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        for client in cluster.clients:
            await client.close()
        if cluster.redis is not None:
            await cluster.redis.aclose()
        if cluster.http is not None:
            await cluster.http.aclose()


class RoutingLoad:
    """Viewer routing through the client at a steady rate, counting every failed call."""

    def __init__(self, client: FoghornClient, rate_per_s: float = 100.0) -> None:
        self.client = client
        self.interval = 1.0 / rate_per_s
        self.calls = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.client.route_viewer("live-0001", lat=48.85, lon=2.35, timeout_s=5.0)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            self.calls += 1
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def __enter__(self) -> RoutingLoad:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a load that crashed must fail the test, not pass it quietly
        self._task.cancel()


async def fleet_owned(cluster: Cluster, by: set[str] | None = None) -> bool:
    owners = await cluster.owners()
    return len(owners) == NODES and (by is None or {o.replica for o in owners.values()} <= by)


async def test_two_replicas_share_a_fleet_and_route_it_identically(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    cluster.start_fleet()
    await eventually(lambda: fleet_owned(cluster), timeout=30)
    owners = await cluster.owners()
    assert {o.replica for o in owners.values()} == {"a", "b"}, "streams spread over both"
    ca, cb = cluster.client(a), cluster.client(b)

    async def same_view() -> bool:
        na = {n.identity.node_id for n in await ca.list_nodes(connected_only=True)}
        nb = {n.identity.node_id for n in await cb.list_nodes(connected_only=True)}
        return len(na) == NODES and na == nb

    await eventually(same_view, timeout=20)
    route_a = await ca.route_viewer("live-0001", lat=48.85, lon=2.35, max_fallbacks=3)
    route_b = await cb.route_viewer("live-0001", lat=48.85, lon=2.35, max_fallbacks=3)
    assert route_a.best.node_id and route_b.considered == route_a.considered == NODES
    assert cluster.http is not None
    metrics = (await cluster.http.get(f"http://127.0.0.1:{b.http_port}/metrics")).text
    in_sync = [line for line in metrics.splitlines() if line.startswith("foghorn_ha_in_sync{")]
    assert in_sync and 'replica="b"' in in_sync[0] and in_sync[0].endswith(" 1.0"), in_sync
    assert "foghorn_ha_sync_lag_seconds_bucket" in metrics
    assert "foghorn_ha_remote_applied" in metrics
    doc = await cluster.health(b)
    figures = doc["figures"]  # the status view's line for replica b
    assert figures["owned"] == doc["ha"]["owned_nodes"] > 0
    assert 0 < figures["sync_lag_p99_ms"] < 10_000  # b applied a's changes, with a real lag


async def test_kill_9_of_an_owner_moves_its_nodes_and_routing_never_fails(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    cluster.start_fleet()
    # An even split first: until then the replicas still hand nodes over to each other (the
    # rebalancing after b joined), and a move made just before the kill is no move to the dead.
    await eventually(lambda: fleet_split_evenly(cluster), timeout=30, what="an even split")
    owners = await cluster.owners()
    victim = a if sum(o.replica == "a" for o in owners.values()) >= NODES / 2 else b
    survivor = b if victim is a else a
    moved = [n for n, o in owners.items() if o.replica == victim.name]
    assert moved, "the victim owns nodes"
    moves_before = (await cluster.health(survivor))["ha"]["rebalance_moves"]
    with RoutingLoad(cluster.client()) as load:
        await asyncio.sleep(0.5)
        victim.proc.kill()
        await eventually(lambda: fleet_owned(cluster, by={survivor.name}), timeout=20)
        after = load.calls
        await eventually(lambda: load.calls > after + 50, timeout=10)

        # The victim stays a member until its replica claim expires (3 renewal periods): the
        # survivor must not send it back any of the nodes that just left it.
        async def victim_left() -> bool:
            return (await cluster.health(survivor))["ha"]["replicas"] == [survivor.target]

        await eventually(victim_left, timeout=10)
    assert load.failures == [], load.failures[:5]
    assert load.calls > 100
    doc = await cluster.health(survivor)
    assert doc["ha"]["owned_nodes"] == NODES
    assert doc["ha"]["rebalance_moves"] == moves_before, "nodes were sent to the dead replica"


async def test_paused_owner_is_fenced_after_takeover_and_drops_the_stream(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    old = NodeStream(cluster.client(a))
    await old.register(register_msg("edge-zombie"))
    old.report(report_msg(11.0))
    await eventually(lambda: fleet_owned_by(cluster, "edge-zombie", "a"), timeout=10)
    fence_a = (await cluster.owners())["edge-zombie"].fence

    a.proc.pause()  # a long GC pause: longer than the ownership TTL (2 s)
    try:
        await eventually(lambda: no_owner(cluster, "edge-zombie"), timeout=10)
        new = NodeStream(cluster.client(b))  # the node reconnects to the live replica
        await new.register(register_msg("edge-zombie"))
        new.report(report_msg(22.0))
        cb = cluster.client(b)
        await eventually(lambda: cpu_is(cb, "edge-zombie", 22.0), timeout=10)
        old.report(report_msg(99.0))  # queued for the zombie: it will try to write this
    finally:
        a.proc.resume()
    assert await old.status(timeout=15) == grpc.StatusCode.ABORTED
    owner = (await cluster.owners())["edge-zombie"]
    assert owner.replica == "b" and owner.fence > fence_a
    ca = cluster.client(a)
    for client in (ca, cb):
        await eventually(lambda c=client: cpu_is(c, "edge-zombie", 22.0), timeout=10)  # type: ignore[misc]
    doc = await cluster.health(a)
    assert doc["ha"]["takeovers"] + doc["ha"]["writes_rejected"] >= 1
    assert doc["ha"]["owned_nodes"] == 0
    await new.close()


async def fleet_split_evenly(cluster: Cluster) -> bool:
    owners = await cluster.owners()
    by = [o.replica for o in owners.values()]
    return len(owners) == NODES and by.count("a") == by.count("b") == NODES // 2


async def fleet_owned_by(cluster: Cluster, node_id: str, replica: str) -> bool:
    owner = (await cluster.owners()).get(node_id)
    return owner is not None and owner.replica == replica


async def no_owner(cluster: Cluster, node_id: str) -> bool:
    return node_id not in await cluster.owners()


async def cpu_is(client: FoghornClient, node_id: str, cpu: float) -> bool:
    try:
        node = await client.get_node(node_id)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False  # not synced to this replica yet
        raise
    return node.last_report.cpu_percent == cpu


async def test_restarted_replica_rehydrates_before_any_node_reconnects(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    cluster.start_replica("a")
    b = cluster.start_replica("b")
    cluster.start_fleet()
    await eventually(lambda: fleet_owned(cluster), timeout=30)
    b.proc.kill()
    await eventually(lambda: fleet_owned(cluster, by={"a"}), timeout=20)
    b.proc.start()  # same port; all nodes now live on a
    await eventually(lambda: answers(cluster, b), timeout=10)
    doc = await cluster.health(b)
    assert doc["counts"]["nodes"] == NODES, "state came from Redis, not from node streams"
    assert doc["ha"]["owned_nodes"] == 0 and doc["status"] == "ok"
    route = await cluster.client(b).route_viewer("live-0001", lat=48.85, lon=2.35)
    assert route.considered == NODES


async def test_trimmed_changelog_forces_a_gap_and_the_paused_replica_reconverges(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(FOGHORN_CHANGELOG_MAXLEN="10", FOGHORN_CHANGELOG_EXACT_TRIM="true")
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    cluster.start_fleet(interval=0.1)
    await eventually(lambda: fleet_owned(cluster), timeout=30)
    before = (await cluster.health(b))["ha"]["rehydrations"]
    b.proc.pause()  # shorter than the ownership TTL: b keeps its nodes, but misses > 10 entries
    await asyncio.sleep(1.0)
    b.proc.resume()

    async def reconverged() -> bool:
        ha = (await cluster.health(b))["ha"]
        return ha["rehydrations"] > before and "trimmed" in ha["last_gap"]

    await eventually(reconverged, timeout=20)
    ca, cb = cluster.client(a), cluster.client(b)
    seen_on_a = {n.identity.node_id: n.version for n in await ca.list_nodes()}
    assert len(seen_on_a) == NODES

    async def b_caught_up() -> bool:
        on_b = {n.identity.node_id: n.version for n in await cb.list_nodes()}
        return all(on_b.get(node, -1) >= version for node, version in seen_on_a.items())

    await eventually(b_caught_up, timeout=20)


async def test_redis_restart_while_serving_keeps_routing_and_reconverges(
    redis_factory: Any, make_cluster: Callable[..., Cluster]
) -> None:
    redis = redis_factory()
    cluster = make_cluster(redis_url=redis.url)
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    cluster.start_fleet()
    await eventually(lambda: fleet_owned(cluster), timeout=30)
    with RoutingLoad(cluster.client()) as load:
        redis.stop()
        await eventually(
            lambda: degraded(cluster, a), timeout=10
        )  # health says so, with the reason
        await asyncio.sleep(1.0)
        redis.start()  # empty: no persistence
        await eventually(lambda: fleet_owned(cluster), timeout=20)  # owners re-published
        for replica in (a, b):
            await eventually(lambda r=replica: healthy(cluster, r), timeout=20)  # type: ignore[misc]
    assert load.failures == [], load.failures[:5]
    cb = cluster.client(b)
    nodes = await cb.list_nodes(connected_only=True)
    assert len(nodes) == NODES


async def degraded(cluster: Cluster, replica: Replica) -> bool:
    doc = await cluster.health(replica)
    return doc["status"] == "degraded" and "redis" in doc["ha"]["reason"].lower()


async def healthy(cluster: Cluster, replica: Replica) -> bool:
    return (await cluster.health(replica))["status"] == "ok"


async def test_leader_lease_moves_when_the_leader_dies_and_epochs_never_repeat(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    replicas = [cluster.start_replica(n) for n in ("a", "b", "c")]
    await eventually(lambda: has_leader(cluster), timeout=15)
    first = await cluster.leader()
    assert first is not None
    claims: dict[int, set[str]] = {}

    async def sample() -> None:
        for r in replicas:
            if not r.proc.running:
                continue
            try:
                ha = (await cluster.health(r))["ha"]
            except Exception:
                continue
            if ha["leader"]:
                claims.setdefault(ha["leader_epoch"], set()).add(r.name)

    await sample()
    victim = next(r for r in replicas if r.name == first.holder)
    victim.proc.kill()

    async def moved() -> bool:
        await sample()
        now = await cluster.leader()
        return now is not None and now.holder != first.holder and now.epoch > first.epoch

    await eventually(moved, timeout=15)
    for _ in range(5):
        await sample()
    assert all(len(holders) == 1 for holders in claims.values()), claims
    assert max(claims) > first.epoch


async def answers(cluster: Cluster, replica: Replica) -> bool:
    try:
        await cluster.health(replica)
    except Exception:
        return False
    return True


async def has_leader(cluster: Cluster) -> bool:
    return await cluster.leader() is not None


async def test_command_through_one_replica_reaches_nodes_owned_by_the_other(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    cluster.start_fleet()
    await eventually(lambda: fleet_owned(cluster), timeout=30)
    owners = await cluster.owners()
    node_on_a = next(n for n, o in owners.items() if o.replica == "a")
    cb = cluster.client(b)  # an operator talking to b only
    reply = await cb.set_mode(node_on_a, "draining", ack_timeout_s=5)
    assert reply.command.acked and reply.command.ok
    assert reply.node.mode == 2  # NODE_MODE_DRAINING, written by its owner a
    ca = cluster.client(a)
    assert (await ca.get_node(node_on_a)).mode == 2
    doc = await cluster.health(a)
    assert doc["ha"]["relay_delivered"] >= 1


async def test_leader_marks_a_dead_owners_silent_node_disconnected_then_evicts_it(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(FOGHORN_STALE_AFTER_S="2", FOGHORN_EVICT_AFTER_S="2")
    a, b = cluster.start_replica("a"), cluster.start_replica("b")
    node = NodeStream(cluster.client(a))  # a node that only knows replica a
    await node.register(register_msg("edge-orphan"))
    node.report(report_msg(10.0))
    cb = cluster.client(b)
    await eventually(lambda: cpu_is(cb, "edge-orphan", 10.0), timeout=10)
    a.proc.kill()  # its owner dies; the node never reconnects anywhere

    async def evicted() -> bool:
        try:
            await cb.get_node("edge-orphan")
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(evicted, timeout=30)
    doc = await cluster.health(b)
    assert doc["ha"]["leader"] and doc["counts"]["evictions"] >= 1
    await node.close()
