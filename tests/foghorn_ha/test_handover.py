"""Foghorn hands its nodes over instead of dropping them: a stopping replica tells every node
where to reconnect (nodes move at once and stay routable meanwhile), nodes learn of replicas
that join from the control stream, and a replica that joins gets its share of the fleet a few
nodes at a time. Real gRPC replicas on one redis-server, ``edge-sim``'s node runners."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from api_balancing.simulator import NodeRunner, Replicas, build_fleet
from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import TOKEN
from tests.foghorn_ha.conftest import eventually

pytestmark = pytest.mark.integration

NODES = 6


class Fleet:
    """``count`` simulated nodes that know only the addresses given at start."""

    def __init__(self, addresses: list[str], count: int) -> None:
        self.replicas = Replicas(addresses, TOKEN)
        nodes = build_fleet(count, seed=7)
        self.runners = [NodeRunner(n, self.replicas, 0.3, slot=i) for i, n in enumerate(nodes)]
        self.tasks = [asyncio.create_task(r.run()) for r in self.runners]

    def on(self, server: Any) -> int:
        return sum(
            1 for r in self.runners if r.connected.is_set() and r.address == server.grpc_target
        )

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.replicas.close()


class Routing:
    """Viewer routing through one replica in a loop; every failure is kept."""

    def __init__(self, target: str) -> None:
        self.client = FoghornClient(target, policy=Policy(timeout=2.0))
        self.ok = 0
        self.failures: list[str] = []
        self.considered: list[int] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                reply = await self.client.route_viewer("live-0001", lat=50.0, lon=8.0)
                self.ok += 1
                self.considered.append(reply.considered)
            except Exception as exc:
                self.failures.append(repr(exc)[:200])
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.close()


@pytest.fixture
async def fleets() -> AsyncIterator[Callable[[list[str], int], Fleet]]:
    made: list[Fleet] = []

    def make(addresses: list[str], count: int = NODES) -> Fleet:
        made.append(Fleet(addresses, count))
        return made[-1]

    yield make
    for fleet in made:
        await fleet.close()


async def move_nodes(source: Any, target: Any) -> int:
    """``foghorn-admin --foghorn SOURCE move-nodes --to TARGET``: how many nodes were told."""
    async with FoghornClient(source.grpc_target, token=TOKEN) as admin:
        reply = await admin.admin.MoveNodes(
            pb.MoveNodesRequest(targets=[target.grpc_target]), timeout=5.0
        )
    return int(reply.told)


def owned(server: Any) -> int:
    return len(server.ha.ownership.owned())


async def test_stopping_replica_hands_every_node_to_the_other_at_once_without_a_failed_routing(
    make_replica: Callable[..., Awaitable[Any]],
    fleets: Callable[[list[str], int], Fleet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FOGHORN_REBALANCE_INTERVAL_S", "0")  # only the stop moves nodes here
    a = await make_replica("a")
    fleet = fleets([a.grpc_target], NODES)
    await eventually(lambda: fleet.on(a) == NODES, what="every node on a")
    b = await make_replica("b")
    # The nodes were told of b on their control stream: no restart, no configuration change.
    await eventually(lambda: b.grpc_target in fleet.replicas.addresses, what="nodes know b")
    await eventually(lambda: len(b.store.snapshot()) == NODES, what="b synced")
    routing = Routing(b.grpc_target)
    try:
        await eventually(lambda: routing.ok > 5, what="routing through b")
        stop = asyncio.create_task(a.stop())
        await asyncio.sleep(0)
        assert not a.health().serving  # NOT_SERVING from the first moment of the stop
        await eventually(lambda: fleet.on(b) == NODES, timeout=5.0, what="every node on b")
        await stop
        await eventually(lambda: owned(b) == NODES, what="b owns every node")
        await asyncio.sleep(0.3)
    finally:
        await routing.close()
    assert routing.failures == []
    # Every node stayed connected and eligible through the move: routing never saw fewer.
    assert min(routing.considered) == NODES
    assert all(r.moved == 1 for r in fleet.runners)  # told once, obeyed at once
    assert b.fleet.counters.evictions == 0
    assert all(rec.connected and rec.owner == "b" for rec in b.store.snapshot())


async def test_replica_that_joins_gets_an_even_share_a_few_nodes_at_a_time(
    make_replica: Callable[..., Awaitable[Any]],
    fleets: Callable[[list[str], int], Fleet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FOGHORN_REBALANCE_INTERVAL_S", "0.3")
    monkeypatch.setenv("FOGHORN_REBALANCE_BATCH", "2")
    count = 10
    a = await make_replica("a")
    fleet = fleets([a.grpc_target], count)
    await eventually(lambda: owned(a) == count, what="a owns every node")
    await eventually(
        lambda: sum(r.connected for r in a.store.snapshot()) == count, what="a routes every node"
    )
    routing = Routing(a.grpc_target)
    try:
        b = await make_replica("b")
        await eventually(lambda: owned(a) == owned(b) == count // 2, what="an even split")
        await asyncio.sleep(1.0)  # and it stays even: no node keeps bouncing
        assert owned(a) == owned(b) == count // 2
    finally:
        await routing.close()
    assert routing.failures == []
    assert min(routing.considered) == count
    # Only the surplus moved, each node once (no node asked twice, none bounced back).
    assert a.ha.membership.moves_asked == count // 2
    assert b.ha.membership.moves_asked == 0
    assert sum(r.moved for r in fleet.runners) == count // 2


async def test_operator_mode_survives_the_switch_to_redis_and_the_rollback_to_memory(
    make_replica: Callable[..., Awaitable[Any]],
    fleets: Callable[[list[str], int], Fleet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The RFC's Phase 1 both ways, as written: an HA replica started beside the in-memory one
    on a fresh Redis, the nodes told of it and moved to it (``MoveNodes`` on the old replica),
    the old one retired (SIGTERM); and back. The operator's mode lives in each store, and travels
    with the node (``Register.mode``) into a store that has none."""
    from api_balancing.config import FoghornConfig
    from api_balancing.server import FoghornApp
    from pkg.events import MemorySink
    from tests.foghorn.conftest import TOKENS

    monkeypatch.setenv("FOGHORN_REBALANCE_INTERVAL_S", "0")
    memory: list[FoghornApp] = []

    async def in_memory(name: str) -> FoghornApp:
        config = FoghornConfig(grpc_port=0, http_port=-1, tokens=TOKENS, replica_id=name)
        app = FoghornApp(config, events=MemorySink())
        memory.append(app)
        await app.start()
        return app

    def mode_on(server: Any) -> tuple[str, str] | None:
        rec = server.store.get("edge-amsterdam-000")
        return None if rec is None else (rec.mode.name, rec.mode_reason)

    try:
        m = await in_memory("m")
        fleet = fleets([m.grpc_target], 2)
        await eventually(lambda: fleet.on(m) == 2, what="nodes on the in-memory replica")
        admin = FoghornClient(m.grpc_target, token=TOKEN)
        try:
            reply = await admin.set_mode("edge-amsterdam-000", "draining", reason="kernel upgrade")
        finally:
            await admin.close()
        assert reply.command.acked
        # Phase 1 rollout: the HA replica beside it (fresh Redis), nodes told of it (here: the
        # file they watch), moved to it, the in-memory replica retired with SIGTERM.
        h = await make_replica("h")
        fleet.replicas.configure([m.grpc_target, h.grpc_target])
        assert await move_nodes(m, h) == 2
        await eventually(lambda: fleet.on(h) == 2, timeout=5.0, what="nodes on the HA replica")
        assert mode_on(h) == ("DRAINING", "kernel upgrade")
        await m.stop()
        # Rollback: an in-memory replica beside it, the nodes moved, the HA one retired.
        m2 = await in_memory("m2")
        fleet.replicas.configure([h.grpc_target, m2.grpc_target])
        assert await move_nodes(h, m2) == 2
        await eventually(lambda: fleet.on(m2) == 2, timeout=5.0, what="nodes back in memory")
        assert mode_on(m2) == ("DRAINING", "kernel upgrade")
        await h.stop()
        assert all(r.moved == 2 for r in fleet.runners)  # moved twice, never dropped
    finally:
        for app in memory:
            await app.stop(grace=0.2)


async def test_move_nodes_refuses_a_target_that_is_not_host_port_and_moves_nothing(
    make_replica: Callable[..., Awaitable[Any]], fleets: Callable[[list[str], int], Fleet]
) -> None:
    a = await make_replica("a")
    fleet = fleets([a.grpc_target], 2)
    await eventually(lambda: fleet.on(a) == 2, what="nodes on a")
    async with FoghornClient(a.grpc_target, token=TOKEN) as admin:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.admin.MoveNodes(
                pb.MoveNodesRequest(targets=["not an address"]), timeout=5.0
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "targets[0]" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as negative:
            await admin.admin.MoveNodes(pb.MoveNodesRequest(max_nodes=-1), timeout=5.0)
        assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fleet.on(a) == 2 and all(r.moved == 0 for r in fleet.runners)


async def test_rollback_moves_every_node_off_both_ha_replicas_without_bouncing_back(
    make_replica: Callable[..., Awaitable[Any]],
    fleets: Callable[[list[str], int], Fleet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rollback of Phase 1 under rebalancing: a replica emptied by move-nodes leaves the
    membership, so its peer does not hand it nodes again while the fleet moves to memory."""
    from api_balancing.config import FoghornConfig
    from api_balancing.server import FoghornApp
    from pkg.events import MemorySink
    from tests.foghorn.conftest import TOKENS

    monkeypatch.setenv("FOGHORN_REBALANCE_INTERVAL_S", "0.2")
    h1, h2 = await make_replica("h1"), await make_replica("h2")
    fleet = fleets([h1.grpc_target, h2.grpc_target], 4)
    await eventually(lambda: owned(h1) == owned(h2) == 2, what="an even split")
    m = FoghornApp(
        FoghornConfig(grpc_port=0, http_port=-1, tokens=TOKENS, replica_id="m"),
        events=MemorySink(),
    )
    await m.start()
    try:
        fleet.replicas.configure([h1.grpc_target, h2.grpc_target, m.grpc_target])
        asked_before = h2.ha.membership.moves_asked
        assert await move_nodes(h1, m) == 2
        await eventually(lambda: fleet.on(m) == 2, timeout=5.0, what="h1's nodes on m")
        await asyncio.sleep(1.0)  # five rebalancing rounds of h2
        assert owned(h1) == 0 and h2.ha.membership.moves_asked == asked_before
        assert await move_nodes(h2, m) == 2
        await eventually(lambda: fleet.on(m) == 4, timeout=5.0, what="every node on m")
    finally:
        await m.stop(grace=0.2)
