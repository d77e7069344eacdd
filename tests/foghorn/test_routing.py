"""Viewer and ingest routing over real gRPC (public, no token needed)."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import httpx
import pytest

from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import Harness, eventually, report_msg

PARIS = (48.86, 2.35)
FRANKFURT = (50.11, 8.68)
TOKYO = (35.68, 139.69)


async def test_viewer_gets_the_least_loaded_near_node(foghorn: Harness) -> None:
    await foghorn.node(
        "paris-busy", report_msg(cpu=95, up=8_000_000_000), lat=PARIS[0], lon=PARIS[1]
    )
    await foghorn.node("paris-idle", report_msg(cpu=5), lat=PARIS[0], lon=PARIS[1])
    await foghorn.node("tokyo-idle", report_msg(cpu=1), lat=TOKYO[0], lon=TOKYO[1])
    reply = await foghorn.anon.route_viewer("s1", lat=48.85, lon=2.30)
    assert reply.best.node_id == "paris-idle"
    # A busy node next door and an idle one across the world both trail the idle neighbour.
    assert sorted(c.node_id for c in reply.fallbacks) == ["paris-busy", "tokyo-idle"]
    scores = [reply.best.score] + [c.score for c in reply.fallbacks]
    assert scores == sorted(scores, reverse=True)
    assert reply.best.distance_km < 10
    assert reply.considered == 3
    urls = {u.protocol: u.url for u in reply.best.urls}
    assert urls["hls"] == "http://paris-idle.example:8080/hls/s1/index.m3u8"
    assert urls["webrtc"] == "http://paris-idle.example:8080/webrtc/s1"
    tokyo = await foghorn.anon.route_viewer("s1", lat=35.0, lon=139.0)
    assert tokyo.best.node_id == "tokyo-idle"


async def test_node_carrying_the_stream_wins_a_close_call(foghorn: Harness) -> None:
    await foghorn.node("a", report_msg(cpu=10))
    await foghorn.node("b", report_msg(cpu=12, streams=(("s1", "acme", 3),)))
    assert (await foghorn.anon.route_viewer("s1")).best.node_id == "b"
    assert (await foghorn.anon.route_viewer("s2")).best.node_id == "a"


async def test_draining_removes_a_node_from_routing_and_normal_brings_it_back(
    foghorn: Harness,
) -> None:
    await foghorn.node("best", report_msg(cpu=1))
    await foghorn.node("other", report_msg(cpu=50))
    assert (await foghorn.anon.route_viewer("s1")).best.node_id == "best"
    await foghorn.ops.set_mode("best", "draining", ack_timeout_s=0.01)
    reply = await foghorn.anon.route_viewer("s1")
    assert reply.best.node_id == "other" and not reply.fallbacks
    await foghorn.ops.set_mode("best", "normal", ack_timeout_s=0.01)
    assert (await foghorn.anon.route_viewer("s1")).best.node_id == "best"


async def test_maintenance_removes_a_node_from_routing(foghorn: Harness) -> None:
    await foghorn.node("only", report_msg())
    await foghorn.ops.set_mode("only", "maintenance", ack_timeout_s=0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.anon.route_viewer("s1")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 maintenance" in (err.value.details() or "")


async def test_requested_protocol_filters_nodes_and_urls(foghorn: Harness) -> None:
    await foghorn.node("hls-only", report_msg(cpu=1), caps=("hls",))
    await foghorn.node("webrtc", report_msg(cpu=50), caps=("hls", "webrtc"))
    reply = await foghorn.anon.route_viewer("s1", protocol="webrtc")
    assert reply.best.node_id == "webrtc" and not reply.fallbacks
    assert [u.protocol for u in reply.best.urls] == ["webrtc"]


async def play(h: Harness, content: str) -> str:
    """GET /play (a redirect issued to a viewer); the node it sent the viewer to."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.server.http_port}") as http:
        reply = await http.get(f"/play/{content}")
    assert reply.status_code == 302, reply.text
    return reply.headers["x-foghorn-node"]


async def test_redirects_spread_a_burst_of_viewers(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(redirect_bps=1_000_000_000, http_port=0)
    await h.node("a", report_msg(cpu=10, limit=10_000_000_000))
    await h.node("b", report_msg(cpu=11, limit=10_000_000_000))
    first, second = await play(h, "s1"), await play(h, "s1")
    assert (first, second) == ("a", "b")  # the pending viewer on "a" costs it bandwidth
    assert (await h.ops.get_node("a")).health.pending_redirects == 1


async def test_a_routing_answer_is_not_a_pending_redirect(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(redirect_bps=1_000_000_000)
    await h.node("a", report_msg(cpu=10, limit=10_000_000_000))
    await h.node("b", report_msg(cpu=11, limit=10_000_000_000))
    answers = [(await h.anon.route_viewer("s1")).best.node_id for _ in range(5)]
    assert answers == ["a"] * 5  # nobody was sent anywhere: nothing is pending
    assert (await h.ops.get_node("a")).health.pending_redirects == 0


async def test_pending_redirect_settles_when_the_viewer_shows_up(make_foghorn) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await make_foghorn(redirect_bps=1_000_000_000, http_port=0)
    stream = await h.node("a", report_msg(streams=(("s1", "acme", 1),)))
    await play(h, "s1")
    assert (await h.ops.get_node("a")).health.pending_redirects == 1
    stream.report(report_msg(streams=(("s1", "acme", 2),)))
    await eventually(lambda: h.fleet.redirects.pending("a") == 0, what="redirect settled")


async def test_ingest_routing_picks_an_ingest_node_and_builds_the_push_url(
    foghorn: Harness,
) -> None:
    await foghorn.node("edge-only", report_msg(cpu=1))
    await foghorn.node(
        "ingest-1", report_msg(cpu=30), roles=("edge", "ingest"), caps=("hls", "rtmp", "srt")
    )
    reply = await foghorn.anon.route_ingest("key-123", lat=50, lon=8)
    assert reply.best.node_id == "ingest-1"
    assert reply.ingest_url == "rtmp://ingest-1.example:1935/live/key-123"
    srt = await foghorn.anon.route_ingest("key-123", protocol="srt")
    assert srt.ingest_url.startswith("srt://ingest-1.example:8890")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.anon.route_ingest("key-123", protocol="whip")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_viewer_ip_is_located_through_the_geoip_table(make_foghorn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "geoip.csv"
    table.write_text(
        "# cidr,lat,lon\n203.0.113.0/24,35.68,139.69,tokyo\n198.51.100.0/24,48.86,2.35\n"
    )
    h: Harness = await make_foghorn(geoip_file=str(table))
    await h.node("paris", report_msg(), lat=PARIS[0], lon=PARIS[1])
    await h.node("tokyo", report_msg(), lat=TOKYO[0], lon=TOKYO[1])
    assert (await h.anon.route_viewer("s1", ip="203.0.113.9")).best.node_id == "tokyo"
    reply = await h.anon.route_viewer("s1", ip="198.51.100.7")
    assert reply.best.node_id == "paris" and reply.viewer_location.latitude == 48.86
    unknown = await h.anon.route_viewer("s1", ip="192.0.2.1")
    assert not unknown.HasField("viewer_location")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ViewerRouteRequest(content_id=""), "content_id"),
        (pb.ViewerRouteRequest(content_id="x" * 257), "content_id"),
        (pb.ViewerRouteRequest(content_id="a b"), "content_id"),
        (pb.ViewerRouteRequest(content_id="s", viewer_ip="999.1.1.1"), "viewer_ip"),
        (pb.ViewerRouteRequest(content_id="s", protocol="gopher"), "protocol"),
        (pb.ViewerRouteRequest(content_id="s", max_fallbacks=17), "max_fallbacks"),
        (pb.ViewerRouteRequest(content_id="s", max_fallbacks=-1), "max_fallbacks"),
        (
            pb.ViewerRouteRequest(content_id="s", location=pb.GeoPoint(latitude=90.1)),
            "location.latitude",
        ),
        (
            pb.ViewerRouteRequest(content_id="s", location=pb.GeoPoint(longitude=math.inf)),
            "location.longitude",
        ),
    ],
)
async def test_bad_route_request_is_invalid_argument_naming_the_field(
    foghorn: Harness, request_: pb.ViewerRouteRequest, field: str
) -> None:
    await foghorn.node("n1", report_msg())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.anon.routing.RouteViewer(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)


async def test_bad_stream_key_is_invalid_argument(foghorn: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.anon.route_ingest("bad/key")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("stream_key")


async def test_no_nodes_at_all_is_resource_exhausted_with_a_reason(foghorn: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await foghorn.anon.route_viewer("s1")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no nodes are registered" in (err.value.details() or "")


async def test_unroutable_requests_say_why_in_full_only_a_few_times_a_second() -> None:
    # Saying why scores every node: a flood of requests that no node can serve must not cost
    # a whole fleet scan each.
    from api_balancing import errors
    from api_balancing.fleet import WHY_NONE_BURST, WHY_NONE_PER_S, Fleet, FleetSettings
    from api_balancing.model import GeoPoint, NodeIdentity
    from api_balancing.scoring import Weights
    from api_balancing.store.memory import MemoryNodeStore
    from pkg.common.clock import FakeClock
    from pkg.events import NullSink

    clock = FakeClock()
    fleet = Fleet(MemoryNodeStore(), clock, FleetSettings(weights=Weights()), NullSink())
    identity = NodeIdentity("n1", frozenset({"edge"}), frozenset(), "http://n1", GeoPoint(1, 2), 10)
    await fleet.register(identity)
    scans = 0
    explain = fleet.explain

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal scans
        scans += 1
        return explain(*args, **kwargs)  # type: ignore[arg-type]

    fleet.explain = counting  # type: ignore[method-assign]
    messages = []
    for _ in range(50):
        with pytest.raises(errors.NoEligibleNode) as caught:
            fleet.route("s1", None, limit=3, role="ingest")  # n1 is no ingest node
        messages.append(str(caught.value))
    assert scans == int(WHY_NONE_BURST)
    assert messages[0].endswith("(1 stale)"), messages[0]  # the full reason
    assert "ExplainRoute" in messages[-1] and "'s1'" in messages[-1]
    clock.advance(1 / WHY_NONE_PER_S)
    with pytest.raises(errors.NoEligibleNode):
        fleet.route("s1", None, limit=3, role="ingest")
    assert scans == int(WHY_NONE_BURST) + 1
