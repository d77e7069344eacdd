"""Platform events Foghorn emits: node lifecycle (system tenant), streams and routing (tenant)."""

from __future__ import annotations

from pkg.events import SYSTEM_TENANT, Event
from tests.foghorn.conftest import Harness, eventually, report_msg


def of(h: Harness, type_: str) -> list[Event]:
    return [e for e in h.events.events if e.type == type_]


async def test_node_lifecycle_events_go_to_the_system_tenant(foghorn: Harness) -> None:
    stream = await foghorn.node("n1", report_msg())
    await foghorn.ops.set_mode("n1", "draining", reason="upgrade", ack_timeout_s=0.01)
    await stream.close()
    await eventually(lambda: bool(of(foghorn, "node.disconnected")))
    (registered,) = of(foghorn, "node.registered")
    assert registered.tenant == SYSTEM_TENANT and registered.data["node_id"] == "n1"
    (changed,) = of(foghorn, "node.mode_changed")
    assert changed.data == {
        "node_id": "n1",
        "mode": "draining",
        "previous": "normal",
        "reason": "upgrade",
    }
    assert of(foghorn, "node.disconnected")[0].tenant == SYSTEM_TENANT


async def test_stream_events_carry_the_streams_tenant_and_fire_fleet_wide_once(
    foghorn: Harness,
) -> None:
    a = await foghorn.node("a", report_msg(streams=(("s1", "acme", 1),)))
    b = await foghorn.node("b", report_msg(streams=(("s1", "acme", 2), ("s2", "globex", 1))))
    started = [(e.data["stream_id"], e.tenant) for e in of(foghorn, "stream.started")]
    assert started == [("s1", "acme"), ("s2", "globex")]  # s1 once, though two nodes carry it
    a.report(report_msg())
    await eventually(lambda: foghorn.reports_of("a") == 2)
    assert of(foghorn, "stream.ended") == []  # b still carries s1
    b.report(report_msg(streams=(("s2", "globex", 1),)))
    await eventually(lambda: bool(of(foghorn, "stream.ended")))
    (ended,) = of(foghorn, "stream.ended")
    assert ended.data["stream_id"] == "s1" and ended.tenant == "acme"


async def test_routing_decisions_are_sampled_into_the_contents_tenant(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(routing_event_sample=1.0)
    await h.node("n1", report_msg(streams=(("s1", "acme", 1),)))
    await h.anon.route_viewer("s1")
    (decision,) = of(h, "routing.decision")
    assert decision.tenant == "acme" and decision.data["node_id"] == "n1"
    quiet: Harness = await make_foghorn(routing_event_sample=0.0)
    await quiet.node("n1", report_msg())
    await quiet.anon.route_viewer("s1")
    assert of(quiet, "routing.decision") == []


async def test_evicting_the_last_carrier_ends_its_streams(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(fake_clock=True)
    stream = await h.node("n1", report_msg(streams=(("s1", "acme", 1),)))
    await stream.close()
    await eventually(lambda: not h.server.store.get("n1").connected)
    assert of(h, "stream.ended") == []  # it may come back: not over yet
    assert h.clock is not None
    h.clock.advance(301)
    assert await h.fleet.reap_once() == ["n1"]
    (ended,) = of(h, "stream.ended")
    assert ended.tenant == "acme" and ended.data["reason"] == "node evicted"
