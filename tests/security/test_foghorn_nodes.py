"""Edge nodes over raw grpcio: a node credential registers only its own node ids, reports only
the tenants it may carry, and can neither displace another credential's connected node nor
re-assign another tenant's stream. Every refusal leaves no trace in the fleet."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.security import conftest as sec
from tests.security.conftest import Foghorn, RawNode, report_msg
from tests.waiting import eventually

pytestmark = pytest.mark.integration

PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


async def test_a_node_credential_cannot_register_an_id_outside_its_patterns(
    channels: Foghorn,
) -> None:
    node = RawNode(channels.channel(), sec.NODE_PARIS)
    node.send(sec.register_msg("edge-berlin-001"))
    code, details = await node.status()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "may not register node 'edge-berlin-001'" in details
    assert "edge-berlin-001" not in await channels.nodes()


async def test_a_node_credential_registers_its_own_ids(channels: Foghorn) -> None:
    node = RawNode(channels.channel(), sec.NODE_PARIS)
    reply = await node.register("edge-paris-001")
    assert reply.registered.node_id == "edge-paris-001"
    node.close()


async def test_an_operator_or_tenant_credential_cannot_open_a_node_stream(
    channels: Foghorn,
) -> None:
    for token in (sec.OPS, sec.ACME_ADMIN, sec.RELAY, sec.NOROLE):
        node = RawNode(channels.channel(), token)
        # Refused before anything is read: sending nothing also avoids a grpc-core race (a
        # client still writing when the status arrives may see INTERNAL instead).
        code, details = await node.status()
        assert code == grpc.StatusCode.PERMISSION_DENIED, token
        assert "requires role node" in details
    assert "edge-paris-050" not in await channels.nodes()


async def test_a_different_credential_cannot_displace_a_connected_node(channels: Foghorn) -> None:
    owner = RawNode(channels.channel(), sec.NODE_PARIS)
    await owner.register("edge-paris-901")
    # The rogue credential's patterns include edge-paris-9*: it may register that id, but not
    # while another credential holds it connected.
    rogue = RawNode(channels.channel(), sec.NODE_ROGUE)
    rogue.send(sec.register_msg("edge-paris-901", region="evil"))
    code, details = await rogue.status()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot displace" in details
    row = (await channels.nodes())["edge-paris-901"]
    assert row["connected"] and row["region"] == "eu-west"
    assert row["base_url"] == "http://edge-paris-901.example:8080"
    owner.send(report_msg(cpu=42))  # the owner's stream is still open and in charge

    async def owner_reported() -> bool:
        return (await channels.nodes())["edge-paris-901"]["cpu_percent"] == 42

    await eventually(owner_reported, what="the owner's report")
    owner.close()


async def test_the_same_credential_reconnecting_replaces_its_own_older_stream(
    channels: Foghorn,
) -> None:
    old = RawNode(channels.channel(), sec.NODE_PARIS)
    await old.register("edge-paris-002")
    new = RawNode(channels.channel(), sec.NODE_PARIS_2)  # another token of the same credential
    reply = await new.register("edge-paris-002")
    assert reply.registered.node_id == "edge-paris-002"
    code, _ = await old.status()
    assert code == grpc.StatusCode.ABORTED  # replaced by the newer stream
    new.close()


async def test_a_report_naming_a_tenant_the_credential_may_not_carry_is_rejected(
    channels: Foghorn,
) -> None:
    node = RawNode(channels.channel(), sec.NODE_PARIS)  # may carry acme only
    await node.register("edge-paris-003")
    node.send(report_msg(("sec-live-1", "globex", 10)))
    rejected = (await node.read()).rejected
    assert rejected.code == PERMISSION_DENIED
    assert rejected.field == "report.streams[0].tenant_id"
    node.send(report_msg(("sec-live-2", "system", 10)))  # reserved for platform events
    rejected = (await node.read()).rejected
    assert rejected.code == PERMISSION_DENIED and "reserved" in rejected.message
    row = (await channels.nodes())["edge-paris-003"]
    assert row["streams"] == 0 and row["cpu_percent"] is None  # nothing was accepted
    node.close()


async def test_one_node_cannot_reassign_another_tenants_stream(channels: Foghorn) -> None:
    paris = RawNode(channels.channel(), sec.NODE_PARIS)
    await paris.register("edge-paris-004")
    paris.send(report_msg(("sec-show", "acme", 5)))
    rogue = RawNode(channels.channel(), sec.NODE_ROGUE)  # may carry acme and globex
    await rogue.register("rogue-1")

    async def carried() -> bool:
        return (await channels.nodes())["edge-paris-004"]["streams"] == 1

    await eventually(carried, what="acme's stream accepted")
    rogue.send(report_msg(("sec-show", "globex", 500)))
    rejected = (await rogue.read()).rejected
    assert rejected.code == PERMISSION_DENIED
    assert "belongs to another tenant" in rejected.message
    assert (await channels.nodes())["rogue-1"]["streams"] == 0
    rogue.send(report_msg(("sec-show", "acme", 3)))  # carrying it for its own tenant is fine
    rogue.send(report_msg(cpu=11))
    paris.close()
    rogue.close()


async def test_a_stream_that_never_registers_is_closed(channels: Foghorn) -> None:
    node = RawNode(channels.channel(), sec.NODE_PARIS)
    code, details = await node.status(timeout=10)  # FOGHORN_REGISTER_TIMEOUT_S=1
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no Register within 1 s" in details


async def test_streams_per_credential_are_capped(channels: Foghorn) -> None:
    first, second = (RawNode(channels.channel(), sec.NODE_SMALL) for _ in range(2))
    await first.register("small-1")
    await second.register("small-2")
    third = RawNode(channels.channel(), sec.NODE_SMALL)  # streams=2
    third.send(sec.register_msg("small-3"))
    code, details = await third.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in details
    assert "small-3" not in await channels.nodes()
    first.close()
    second.close()


async def test_a_region_with_control_characters_is_refused(channels: Foghorn) -> None:
    node = RawNode(channels.channel(), sec.NODE_PARIS)
    node.send(sec.register_msg("edge-paris-005", region="eu\x1b[31mwest"))
    code, details = await node.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "register.region" in details
    assert "edge-paris-005" not in await channels.nodes()


async def test_an_undecodable_body_is_invalid_argument(channels: Foghorn) -> None:
    channel = channels.channel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/foghorn.v1.Routing/RouteViewer")(b"\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (err.value.details() or "")
    stream = channel.stream_stream("/foghorn.v1.NodeControl/Connect")(
        iter([b"\x0a\xff\xff"]), metadata=sec.auth(sec.NODE_PARIS)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_in_ha_a_different_credential_cannot_displace_a_node_through_another_replica(
    foghorn_factory: Callable[..., Foghorn], redis_server: Any
) -> None:
    cluster = {"FOGHORN_REDIS_URL": redis_server.url, "FOGHORN_CLUSTER": f"d{uuid.uuid4().hex[:6]}"}
    a, b = foghorn_factory(cluster, name="ha-a"), foghorn_factory(cluster, name="ha-b")
    try:
        owner = RawNode(a.channel(), sec.NODE_PARIS)
        await owner.register("edge-paris-950")

        async def b_sees_it() -> bool:
            return (await b.nodes()).get("edge-paris-950", {}).get("connected") is True

        await eventually(b_sees_it, what="replica b sees the node connected")
        rogue = RawNode(b.channel(), sec.NODE_ROGUE)
        rogue.send(sec.register_msg("edge-paris-950", region="evil"))
        code, details = await rogue.status()
        assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot displace" in details
        for replica in (a, b):
            row = (await replica.nodes())["edge-paris-950"]
            assert row["owner"] == "ha-a" and row["region"] == "eu-west"
        owner.send(report_msg(cpu=33))  # still the owner's stream

        async def reported() -> bool:
            return (await a.nodes())["edge-paris-950"]["cpu_percent"] == 33

        await eventually(reported, what="the owner's report")
        owner.close()
    finally:
        await a.close_channels()
        await b.close_channels()
