"""Node admin and commands over real gRPC: auth, modes, listing, explanations, acks."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pkg.clients.foghorn import FoghornClient
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import Harness, NodeStream, register_msg, report_msg


async def test_admin_calls_require_a_token(foghorn: Harness) -> None:
    await foghorn.node("n1", report_msg())
    for call in (
        foghorn.anon.list_nodes(),
        foghorn.anon.get_node("n1"),
        foghorn.anon.set_mode("n1", "draining"),
        foghorn.anon.explain_route("s1"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_node_control_requires_a_token(foghorn: Harness) -> None:
    stream = NodeStream(foghorn.anon)
    stream.send(pb.NodeMessage(register=register_msg("n1")))
    assert await stream.status() == grpc.StatusCode.UNAUTHENTICATED
    assert foghorn.server.store.get("n1") is None


async def test_unknown_token_is_rejected_even_on_public_routing(foghorn: Harness) -> None:
    bad = FoghornClient(foghorn.server.grpc_target, token="wrong")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad.route_viewer("s1")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bad.close()


async def test_viewer_routing_is_public(foghorn: Harness) -> None:
    await foghorn.node("n1", report_msg())
    assert (await foghorn.anon.route_viewer("s1")).best.node_id == "n1"


@pytest.mark.parametrize("call", ["get", "set_mode", "command"])
async def test_unknown_node_in_admin_calls_is_not_found(foghorn: Harness, call: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if call == "get":
            await foghorn.ops.get_node("ghost")
        elif call == "set_mode":
            await foghorn.ops.set_mode("ghost", "draining")
        else:
            await foghorn.ops.send_command("ghost", pb.Command(drain=pb.DrainCommand()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (err.value.details() or "")


async def test_bad_admin_input_is_invalid_argument_naming_the_field(foghorn: Harness) -> None:
    await foghorn.node("n1", report_msg())
    cases = [
        (foghorn.ops.admin.SetMode(pb.SetModeRequest(node_id="n1", mode=0)), "mode"),
        (foghorn.ops.admin.SetMode(pb.SetModeRequest(node_id="n1", mode=9)), "mode"),
        (foghorn.ops.admin.SetMode(pb.SetModeRequest(node_id="", mode=1)), "node_id"),
        (
            foghorn.ops.admin.SetMode(pb.SetModeRequest(node_id="n1", mode=1, reason="r" * 300)),
            "reason",
        ),
        (foghorn.ops.admin.SendCommand(pb.SendCommandRequest(node_id="n1")), "command.action"),
        (
            foghorn.ops.admin.SendCommand(
                pb.SendCommandRequest(
                    node_id="n1", command=pb.Command(drain=pb.DrainCommand()), timeout_s=-1
                )
            ),
            "timeout_s",
        ),
        (
            foghorn.ops.admin.SendCommand(
                pb.SendCommandRequest(
                    node_id="n1", command=pb.Command(drain=pb.DrainCommand(target_viewers=-2))
                )
            ),
            "command.drain.target_viewers",
        ),
        (foghorn.ops.admin.ListNodes(pb.ListNodesRequest(mode=7)), "mode"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (err.value.details() or "").startswith(field)


async def test_list_nodes_filters_by_mode_and_connection(foghorn: Harness) -> None:
    await foghorn.node("a", report_msg())
    b = await foghorn.node("b", report_msg())
    await foghorn.ops.set_mode("a", "draining", ack_timeout_s=0.01)
    assert [n.identity.node_id for n in await foghorn.ops.list_nodes()] == ["a", "b"]
    assert [n.identity.node_id for n in await foghorn.ops.list_nodes(mode="draining")] == ["a"]
    await b.close()
    from tests.foghorn.conftest import eventually

    await eventually(lambda: not foghorn.server.store.get("b").connected)
    connected = await foghorn.ops.list_nodes(connected_only=True)
    assert [n.identity.node_id for n in connected] == ["a"]


async def test_commands_reach_the_node_and_the_ack_comes_back(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    pending = asyncio.ensure_future(
        foghorn.ops.send_command(
            "n1", pb.Command(stop_sessions=pb.StopSessionsCommand(stream_id="s1")), timeout_s=5
        )
    )
    msg = await stream.read()
    assert msg.command.stop_sessions.stream_id == "s1" and msg.command.request_id
    stream.send(
        pb.NodeMessage(
            ack=pb.CommandAck(request_id=msg.command.request_id, ok=True, message="stopped 3")
        )
    )
    result = await pending
    assert result.acked and result.ok and result.message == "stopped 3"
    assert result.request_id == msg.command.request_id


async def test_set_mode_pushes_the_mode_to_the_node_and_reports_its_ack(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    pending = asyncio.ensure_future(
        foghorn.ops.set_mode("n1", "draining", reason="upgrade", ack_timeout_s=5)
    )
    msg = await stream.read()
    assert msg.command.set_mode.mode == pb.NODE_MODE_DRAINING
    assert msg.command.set_mode.reason == "upgrade"
    stream.send(pb.NodeMessage(ack=pb.CommandAck(request_id=msg.command.request_id, ok=True)))
    reply = await pending
    assert reply.command.acked and reply.node.mode == pb.NODE_MODE_DRAINING
    assert reply.node.mode_reason == "upgrade"


async def test_command_without_ack_times_out_with_deadline_exceeded(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.ops.send_command("n1", pb.Command(drain=pb.DrainCommand()), timeout_s=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not acknowledge" in (err.value.details() or "")
    # A late ack is ignored (counted), not an error.
    msg = await stream.read()
    stream.send(pb.NodeMessage(ack=pb.CommandAck(request_id=msg.command.request_id, ok=True)))
    from tests.foghorn.conftest import eventually

    await eventually(lambda: foghorn.server.sessions.acks_unmatched == 1)


async def test_command_to_a_disconnected_node_is_failed_precondition(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    await stream.close()
    from tests.foghorn.conftest import eventually

    await eventually(lambda: not foghorn.server.store.get("n1").connected)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.ops.send_command("n1", pb.Command(drain=pb.DrainCommand()), timeout_s=1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = await foghorn.ops.set_mode("n1", "maintenance")
    assert not reply.command.delivered  # mode is stored; the node is told when it can be


async def test_node_disconnecting_mid_command_fails_it_at_once(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    pending = asyncio.ensure_future(
        foghorn.ops.send_command("n1", pb.Command(drain=pb.DrainCommand()), timeout_s=30)
    )
    await stream.read()
    await stream.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(pending, 10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_explain_route_gives_score_parts_and_rejection_reasons(foghorn: Harness) -> None:
    await foghorn.node("good", report_msg(cpu=20, streams=(("s1", "acme", 1),)))
    await foghorn.node("worse", report_msg(cpu=80))
    await foghorn.node("drained", report_msg())
    await foghorn.node("full", report_msg(up=10_000_000_000, limit=10_000_000_000))
    await foghorn.node("no-webrtc", report_msg(), caps=("hls",))
    await foghorn.ops.set_mode("drained", "draining", reason="upgrade", ack_timeout_s=0.01)
    reply = await foghorn.ops.explain_route("s1", lat=50, lon=8, protocol="webrtc")
    by_id = {n.node_id: n for n in reply.nodes}
    assert [n.node_id for n in reply.nodes if n.eligible] == ["good", "worse"]
    good = by_id["good"]
    assert good.rank == 1 and good.parts.cpu == 400 and good.parts.stream_bonus == 50
    assert abs(good.score - (good.parts.cpu + good.parts.ram + good.parts.bandwidth
                             + good.parts.geo + good.parts.stream_bonus)) < 1e-6  # fmt: skip
    assert by_id["drained"].rejection == pb.REJECTION_DRAINING
    assert "upgrade" in by_id["drained"].reason
    assert by_id["full"].rejection == pb.REJECTION_NO_BANDWIDTH
    assert by_id["no-webrtc"].rejection == pb.REJECTION_NO_CAPABILITY
    assert "cpu=500" in reply.weights
    # The explanation agrees with the actual decision.
    route = await foghorn.anon.route_viewer("s1", lat=50, lon=8, protocol="webrtc")
    assert route.best.node_id == "good" and abs(route.best.score - good.score) < 1e-3
