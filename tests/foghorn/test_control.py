"""Node control stream over real gRPC: register, reports, bad input, reconnects, lifecycle."""

from __future__ import annotations

import math

import grpc
import pytest

from api_balancing.model import NodeMode
from pkg.common.auth import parse_tokens
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import (
    TOKEN,
    TOKENS,
    Harness,
    NodeStream,
    eventually,
    register_msg,
    report_msg,
)


async def test_node_registers_and_its_report_is_stored(foghorn: Harness) -> None:
    await foghorn.node("n1", report_msg(cpu=42, streams=(("s1", "acme", 7),)))
    info = await foghorn.ops.get_node("n1")
    assert info.health.connected and not info.health.stale
    assert info.last_report.cpu_percent == 42
    assert info.last_report.streams[0].viewers == 7
    assert info.mode == pb.NODE_MODE_NORMAL


async def test_report_before_register_ends_the_stream_with_failed_precondition(
    foghorn: Harness,
) -> None:
    stream = NodeStream(foghorn.ops)
    stream.report(report_msg())
    assert await stream.status() == grpc.StatusCode.FAILED_PRECONDITION
    assert "before register" in (await stream.call.details())


async def test_second_register_on_one_stream_is_refused(foghorn: Harness) -> None:
    stream = await foghorn.node("n1")
    stream.send(pb.NodeMessage(register=register_msg("n1")))
    assert await stream.status() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already registered" in (await stream.call.details())


@pytest.mark.parametrize(
    ("register", "field"),
    [
        (register_msg(""), "register.node_id"),
        (register_msg("x" * 129), "register.node_id"),
        (register_msg("bad id!"), "register.node_id"),
        (register_msg("n1", lat=91, lon=0), "register.location.latitude"),
        (register_msg("n1", lat=0, lon=-180.5), "register.location.longitude"),
        (register_msg("n1", lat=math.nan, lon=0), "register.location.latitude"),
        (register_msg("n1", roles=()), "register.roles"),
        (register_msg("n1", roles=("viewer",)), "register.roles[0]"),
        (register_msg("n1", caps=("carrier-pigeon",)), "register.capabilities[0]"),
        (register_msg("n1", capacity=-1), "register.capacity"),
    ],
)
async def test_bad_register_is_invalid_argument_naming_the_field(
    foghorn: Harness, register: pb.Register, field: str
) -> None:
    stream = NodeStream(foghorn.ops)
    stream.send(pb.NodeMessage(register=register))
    assert await stream.status() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stream.call.details()).startswith(field)


@pytest.mark.parametrize(
    ("report", "field", "code"),
    [
        (report_msg(cpu=100.5), "report.cpu_percent", 3),
        (report_msg(cpu=-1), "report.cpu_percent", 3),
        (report_msg(cpu=math.nan), "report.cpu_percent", 3),
        (report_msg(cpu=math.inf), "report.cpu_percent", 3),
        (report_msg(ram_used=-5), "report.ram_used_bytes", 3),
        (report_msg(ram_used=10, ram_max=5), "report.ram_used_bytes", 3),
        (report_msg(ram_max=0), "report.ram_max_bytes", 3),
        (report_msg(up=-1), "report.upload_bps", 3),
        (report_msg(limit=-1), "report.bandwidth_limit_bps", 3),
        (report_msg(streams=(("", "acme", 1),)), "report.streams[0].stream_id", 3),
        (report_msg(streams=(("s1", "", 1),)), "report.streams[0].tenant_id", 3),
        (report_msg(streams=(("s1", "acme", -3),)), "report.streams[0].viewers", 3),
        (report_msg(streams=(("s1", "a", 1), ("s1", "a", 2))), "report.streams[1].stream_id", 3),
        (report_msg(streams=tuple((f"s{i}", "a", 1) for i in range(5001))), "report.streams", 8),
    ],
)
async def test_bad_report_is_rejected_counted_and_the_stream_stays_open(
    foghorn: Harness, report: pb.LoadReport, field: str, code: int
) -> None:
    stream = await foghorn.node("n1", report_msg(cpu=30))
    stream.report(report)
    reply = await stream.read()
    assert reply.WhichOneof("msg") == "rejected"
    assert reply.rejected.field == field and reply.rejected.code == code
    assert reply.rejected.message.startswith(field)
    info = await foghorn.ops.get_node("n1")
    assert info.last_report.cpu_percent == 30  # last good state kept
    assert info.health.reports_rejected == 1 and info.health.connected
    # The stream still works: a good report after the bad one is accepted.
    stream.report(report_msg(cpu=31))
    await eventually(lambda: foghorn.reports_of("n1") == 2)


async def test_empty_node_message_is_invalid_argument(foghorn: Harness) -> None:
    stream = NodeStream(foghorn.ops)
    stream.send(pb.NodeMessage())
    assert await stream.status() == grpc.StatusCode.INVALID_ARGUMENT


async def test_message_above_the_size_limit_is_resource_exhausted(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h = await make_foghorn(max_message_bytes=64 * 1024)
    stream = await h.node("n1", report_msg())
    big = report_msg(streams=tuple((f"stream-{i:05d}-{'x' * 40}", "acme", 1) for i in range(2000)))
    assert big.ByteSize() > 64 * 1024
    stream.report(big)
    assert await stream.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.server.grpc is not None  # the server lives on
    assert (await h.ops.get_node("n1")).last_report.cpu_percent == 10


async def test_reconnecting_node_replaces_its_old_stream_cleanly(foghorn: Harness) -> None:
    old = await foghorn.node("n1", report_msg(cpu=10))
    await foghorn.ops.set_mode("n1", "maintenance", ack_timeout_s=0.01)
    new = await foghorn.node("n1", report_msg(cpu=20))
    assert await old.status() == grpc.StatusCode.ABORTED
    info = await foghorn.ops.get_node("n1")
    assert info.health.connected  # the old stream's end did not mark the node gone
    assert info.mode == pb.NODE_MODE_MAINTENANCE  # mode survives reconnects
    assert info.last_report.cpu_percent == 20
    # Commands go to the new stream.
    new_cmd = foghorn.ops.send_command(
        "n1", pb.Command(drain=pb.DrainCommand(target_viewers=0)), timeout_s=5
    )
    import asyncio

    task = asyncio.ensure_future(new_cmd)
    msg = await new.read()
    new.send(pb.NodeMessage(ack=pb.CommandAck(request_id=msg.command.request_id, ok=True)))
    assert (await task).acked


async def test_disconnected_node_is_not_routable_and_evicted_after_five_minutes(
    make_foghorn,  # type: ignore[no-untyped-def]
) -> None:
    h: Harness = await make_foghorn(fake_clock=True)
    stream = await h.node("n1", report_msg())
    await stream.close()
    await eventually(lambda: not h.server.store.get("n1").connected, what="disconnect seen")
    info = await h.ops.get_node("n1")
    assert not info.health.connected and info.health.disconnected_at > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.anon.route_viewer("s1")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.clock is not None
    h.clock.advance(299)
    assert await h.fleet.reap_once() == []
    h.clock.advance(2)
    assert await h.fleet.reap_once() == ["n1"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.ops.get_node("n1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_node_without_reports_for_90_seconds_is_stale(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(fake_clock=True, stale_after_s=90)
    stream = await h.node("n1", report_msg())
    assert (await h.anon.route_viewer("s1")).best.node_id == "n1"
    assert h.clock is not None
    h.clock.advance(91)
    assert (await h.ops.get_node("n1")).health.stale
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.anon.route_viewer("s1")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 stale" in (err.value.details() or "")
    stream.report(report_msg())  # a fresh report makes it routable again
    await eventually(lambda: h.reports_of("n1") == 2)
    assert (await h.anon.route_viewer("s1")).best.node_id == "n1"


async def test_stale_and_eviction_timings_are_configurable(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(fake_clock=True, stale_after_s=10, evict_after_s=20)
    stream = await h.node("n1", report_msg())
    assert h.clock is not None
    h.clock.advance(11)
    assert (await h.ops.get_node("n1")).health.stale
    await stream.close()
    await eventually(lambda: not h.server.store.get("n1").connected)
    h.clock.advance(21)
    assert await h.fleet.reap_once() == ["n1"]


async def test_mode_is_kept_after_disconnect_until_eviction(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    await foghorn.ops.set_mode("n1", "draining", ack_timeout_s=0.01)
    await stream.close()
    await eventually(lambda: not foghorn.server.store.get("n1").connected)
    back = await foghorn.node("n1", report_msg())
    assert back is not None
    assert foghorn.server.store.get("n1").mode is NodeMode.DRAINING


async def test_flood_of_bad_reports_is_counted_and_the_stream_survives(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    for _ in range(500):  # sent without reading the rejections
        stream.report(report_msg(cpu=-1))
    await eventually(
        lambda: foghorn.fleet.counters.reports_rejected == 500, what="every bad report counted"
    )
    assert (await foghorn.ops.get_node("n1")).health.reports_rejected == 500
    stream.report(report_msg(cpu=55))  # still serving the stream
    await eventually(lambda: foghorn.reports_of("n1") == 2)


async def test_rejection_notices_stop_queueing_for_a_node_that_does_not_read(
    foghorn: Harness,
) -> None:
    import asyncio

    from api_balancing.handlers import MAX_QUEUED_REJECTIONS

    await foghorn.node("n1", report_msg())
    outbox: asyncio.Queue[object] = asyncio.Queue()
    for _ in range(MAX_QUEUED_REJECTIONS):
        outbox.put_nowait(object())  # the node's stream is backed up this far
    node = parse_tokens(TOKENS)[TOKEN]
    await foghorn.server.control._report(node, "n1", report_msg(cpu=-1), outbox)
    assert outbox.qsize() == MAX_QUEUED_REJECTIONS  # nothing more queued...
    assert foghorn.fleet.counters.reports_rejected == 1  # ...but counted
