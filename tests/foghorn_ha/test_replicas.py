"""Foghorn replicas sharing one Redis (in-process, real gRPC): convergence, ownership, relay,
leadership, degraded mode."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from pkg.clients.foghorn import FoghornClient
from pkg.coord import ChangelogSet
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import NodeStream, register_msg, report_msg
from tests.foghorn_ha.conftest import eventually

pytestmark = pytest.mark.integration


async def connect_node(
    client: FoghornClient, node_id: str, cpu: float = 10.0, **register: Any
) -> NodeStream:
    stream = NodeStream(client)
    await stream.register(register_msg(node_id, **register))
    stream.report(report_msg(cpu))
    return stream


def reported(server: Any, node_id: str, at_least: int = 1) -> Callable[[], bool]:
    def check() -> bool:
        rec = server.store.get(node_id)
        return rec is not None and rec.reports_accepted >= at_least

    return check


async def test_node_on_a_is_routed_by_b_and_three_replicas_agree(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    replicas = [await make_replica(name) for name in ("a", "b", "c")]
    a = clients(replicas[0].grpc_target)
    streams = [await connect_node(a, f"edge-{i}", cpu=10.0 + 20 * i) for i in range(3)]
    for server in replicas:
        for i in range(3):
            await eventually(reported(server, f"edge-{i}"))
    answers = set()
    for server in replicas:
        reply = await clients(server.grpc_target).route_viewer("s1", lat=50.0, lon=8.0)
        answers.add((reply.best.node_id, tuple(f.node_id for f in reply.fallbacks)))
    assert answers == {("edge-0", ("edge-1", "edge-2"))}
    for s in streams:
        await s.close()


async def test_records_carry_the_owner_and_its_fence(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    stream = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    rec = b.store.get("edge-1")
    assert rec.owner == "a" and rec.owner_fence >= 1
    owner = await a.ha.ownership.lookup("edge-1")
    assert owner.replica == "a" and owner.address == a.grpc_target
    assert owner.fence == rec.owner_fence
    await stream.close()


async def test_admin_command_on_b_is_relayed_to_the_owner_and_the_ack_comes_back(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    stream = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    ops_b = clients(b.grpc_target)
    request = pb.SendCommandRequest(
        node_id="edge-1", command=pb.Command(drain=pb.DrainCommand(target_viewers=3)), timeout_s=5
    )
    pending = asyncio.ensure_future(ops_b.admin.SendCommand(request, timeout=10))
    command = await stream.read()
    assert command.WhichOneof("msg") == "command" and command.command.drain.target_viewers == 3
    stream.send(pb.NodeMessage(ack=pb.CommandAck(request_id=command.command.request_id, ok=True)))
    result = await pending
    assert result.acked and result.ok and result.request_id == command.command.request_id
    assert a.ha.relay_servicer.delivered == 1 and b.ha.relay.relayed == 1
    await stream.close()


async def test_set_mode_on_b_is_written_by_the_owner_and_seen_everywhere(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    stream = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    ops_b = clients(b.grpc_target)
    pending = asyncio.ensure_future(
        ops_b.admin.SetMode(
            pb.SetModeRequest(
                node_id="edge-1", mode=pb.NODE_MODE_DRAINING, reason="t", ack_timeout_s=5
            ),
            timeout=10,
        )
    )
    command = await stream.read()
    stream.send(pb.NodeMessage(ack=pb.CommandAck(request_id=command.command.request_id, ok=True)))
    reply = await pending
    assert reply.node.mode == pb.NODE_MODE_DRAINING and reply.command.acked
    for server in (a, b):
        rec = server.store.get("edge-1")
        assert rec.mode.name == "DRAINING" and rec.owner == "a"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients(b.grpc_target).route_viewer("s1", lat=50.0, lon=8.0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the only node drains
    await stream.close()


async def test_reconnect_to_b_takes_ownership_and_a_aborts_its_stream(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    old = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    fence_a = a.store.get("edge-1").owner_fence
    new = await connect_node(clients(b.grpc_target), "edge-1", cpu=50.0)
    assert await old.status() == grpc.StatusCode.ABORTED
    await eventually(lambda: a.store.get("edge-1").owner == "b")
    rec = a.store.get("edge-1")
    assert rec.owner_fence > fence_a
    assert a.ha.ownership.fence_of("edge-1") is None
    await new.close()


async def test_a_report_refused_by_redis_aborts_the_stale_stream_without_the_changelog(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    old = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    await a.store.pause_sync()  # A will not hear of the takeover: only Redis can tell it
    new = await connect_node(clients(b.grpc_target), "edge-1", cpu=50.0)
    await eventually(reported(b, "edge-1", at_least=2))
    assert a.ha.ownership.fence_of("edge-1") is not None, "A still believes it owns the node"
    old.report(report_msg(77.0))  # staged on A, refused when written: A closes the stream
    assert await old.status() == grpc.StatusCode.ABORTED
    assert a.ha.ownership.fence_of("edge-1") is None
    assert a.store.counters.writes_rejected >= 1
    a.store.resume_sync()
    await eventually(lambda: a.store.get("edge-1").owner == "b")
    assert b.store.get("edge-1").report.cpu_percent == 50.0
    await new.close()


async def test_exactly_one_leader_and_the_lease_moves_when_it_stops(
    make_replica: Callable[..., Awaitable[Any]],
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    await eventually(lambda: a.ha.lease.is_leader() or b.ha.lease.is_leader())
    assert a.ha.lease.is_leader() != b.ha.lease.is_leader()
    leader, other = (a, b) if a.ha.lease.is_leader() else (b, a)
    epoch = leader.ha.lease.epoch
    await leader.stop(grace=0.1)
    await eventually(other.ha.lease.is_leader)
    assert other.ha.lease.epoch > epoch


async def test_redis_outage_keeps_routing_reports_degraded_and_reconverges(
    redis_factory: Any,
    make_replica: Callable[..., Awaitable[Any]],
    clients: Callable[[Any], FoghornClient],
) -> None:
    redis = redis_factory()
    a = await make_replica("a", url=redis.url)
    b = await make_replica("b", url=redis.url)
    stream = await connect_node(clients(a.grpc_target), "edge-1", cpu=10.0)
    await eventually(reported(b, "edge-1"))
    route_b = clients(b.grpc_target)
    redis.stop()
    stream.report(report_msg(70.0))
    await eventually(lambda: a.store.get("edge-1").report.cpu_percent == 70.0)
    await eventually(lambda: a.health().to_json()["status"] == "degraded")
    doc = a.health().to_json()
    assert "redis" in doc["ha"]["reason"].lower()
    for _ in range(20):  # routing keeps answering from memory on both replicas
        assert (await route_b.route_viewer("s1", lat=50.0, lon=8.0)).best.node_id == "edge-1"
    redis.start()
    await eventually(
        lambda: a.health().to_json()["status"] == "ok" and b.health().to_json()["status"] == "ok"
    )
    await eventually(lambda: b.store.get("edge-1").report.cpu_percent == 70.0)
    stream.report(report_msg(20.0))
    await eventually(lambda: b.store.get("edge-1").report.cpu_percent == 20.0)
    owner = await a.ha.ownership.lookup("edge-1")  # restored in the restarted (empty) Redis
    assert owner is not None and owner.replica == "a"
    await stream.close()


async def test_relay_to_a_dead_owner_evicts_its_record_and_says_not_connected(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    stream = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    seen = await b.ha.ownership.lookup("edge-1")
    assert seen is not None and seen.replica == "a"
    await a.grpc.server.stop(None)  # a is gone...

    # ...leaving its ownership record behind, as a crashed process does (in this process a's
    # stream handler released it on the way out, so put the crashed owner's record back).
    async def released() -> bool:
        return await b.ha.ownership.lookup("edge-1") is None

    await eventually(released)
    await b.store.redis.set(b.store.keys.owner("edge-1"), seen.encode(), px=30_000)
    request = pb.SendCommandRequest(
        node_id="edge-1", command=pb.Command(drain=pb.DrainCommand(target_viewers=0)), timeout_s=2
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await clients(b.grpc_target).admin.SendCommand(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unreachable" in (err.value.details() or "")
    assert await b.ha.ownership.lookup("edge-1") is None, "the dead owner's record was evicted"
    assert b.ha.relay.evicted == 1
    await stream.close()


async def test_graceful_stop_hands_nodes_over_without_marking_them_down(
    make_replica: Callable[..., Awaitable[Any]], clients: Callable[[Any], FoghornClient]
) -> None:
    a = await make_replica("a")
    b = await make_replica("b")
    stream = await connect_node(clients(a.grpc_target), "edge-1")
    await eventually(reported(b, "edge-1"))
    states: list[bool] = []
    b.store.add_listener(lambda node_id, rec: states.append(rec.connected) if rec else None)
    await a.stop(grace=0.2)
    assert await b.ha.ownership.lookup("edge-1") is None, "released for the next replica"
    loop = b.store.sync_loop  # b has applied everything a ever wrote:
    a_log = b.store.keys.log("a")
    tail = (await ChangelogSet.tails(b.store.redis, [a_log]))[a_log]
    await eventually(lambda: loop.reader.positions[a_log].index >= tail.index)
    assert b.store.get("edge-1").connected and False not in states
    # the node reconnects to b (as edge-sim does through pkg.clients) and b owns it
    await stream.close()
    new = await connect_node(clients(b.grpc_target), "edge-1")
    await eventually(lambda: b.store.get("edge-1").owner == "b")
    await new.close()


async def test_a_second_process_with_the_same_replica_id_refuses_to_start(
    make_replica: Callable[..., Awaitable[Any]],
) -> None:
    from api_balancing.ha.replicas import ReplicaIdInUse

    a = await make_replica("a")
    with pytest.raises(ReplicaIdInUse, match="already used by the live replica at"):
        await make_replica("a")
    assert a.health().to_json()["ha"]["status"] == "ok"
