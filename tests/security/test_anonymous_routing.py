"""Anonymous routing cannot starve real viewers: a flood of anonymous routing calls from one
address is rate limited (RESOURCE_EXHAUSTED with grpc-retry-pushback-ms, HTTP 429 with
Retry-After), its pending redirects are capped, and a viewer at another address is routed
every time while it lasts.

The flood is offered by h2load (``devtools.flood``), so it really reaches its rate; its length
is ``SEC_FLOOD_S`` (default 3 s; the 10 s figure of docs/security.md is ``./dev bench flood``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import grpc
import grpc.aio
import httpx
import pytest

from devtools.flood import VIEWER_ADDRESS, flood, summary
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc
from tests.security import conftest as sec
from tests.security.conftest import Foghorn, RawNode, report_msg
from tests.waiting import eventually

pytestmark = pytest.mark.integration

FLOOD_S = float(os.environ.get("SEC_FLOOD_S", "3"))
FLOOD_RATE = 2000.0  # calls per second offered (half gRPC RouteViewer, half HTTP /play)


@pytest.fixture(scope="module")
def small_fleet_foghorn(foghorn_factory: Callable[..., Foghorn]) -> Foghorn:
    return foghorn_factory(
        # Low limits: even a flood slowed down by a busy machine goes over them.
        {"FOGHORN_ANON_ROUTES_PER_S": "5", "FOGHORN_ANON_ROUTE_BURST": "10"},
        name="fog-flood",
    )


async def _nodes(fog: Foghorn) -> list[RawNode]:
    """Three nodes with bandwidth headroom for 8 pending viewers each (20 Mbps at 2.5)."""
    nodes = []
    for i in range(3):
        node = RawNode(fog.channel(), sec.NODE_PARIS)
        await node.register(f"edge-paris-flood-{i}")
        report = report_msg(("live-1", "acme", 10), cpu=10.0 + i)
        report.report.upload_bps, report.report.bandwidth_limit_bps = 80_000_000, 100_000_000
        node.send(report)
        nodes.append(node)

    async def reported() -> bool:
        rows = await fog.nodes()
        return all(rows[f"edge-paris-flood-{i}"]["cpu_percent"] is not None for i in range(3))

    await eventually(reported, what="three nodes reporting")
    return nodes


async def test_an_anonymous_flood_leaves_a_real_viewer_routed_every_time(
    small_fleet_foghorn: Foghorn,
) -> None:
    fog = small_fleet_foghorn
    nodes = await _nodes(fog)
    result = await flood(
        fog.grpc_port, fog.http_port, operator_token=sec.OPS, rate=FLOOD_RATE,
        # 4 calls/s: under the viewer's own limit of 5/s, as a real viewer is.
        duration_s=FLOOD_S, viewer_address=VIEWER_ADDRESS, viewer_interval_s=0.25,
    )  # fmt: skip
    print(summary(result))
    grpc_side, play, viewer = result["grpc"], result["play"], result["viewer"]
    # The flood is really offered (h2load, not a Python client): at least half the aimed rate
    # even on a loaded machine (the benchmark's 10 s run records the full figure).
    assert result["offered_per_s"] >= FLOOD_RATE / 2, result
    # The viewer, at another address, is routed every time, over /play and over gRPC.
    # (A saturated Foghorn answers it late: p50 ~0.9 s at load 8, in the printed summary.)
    assert viewer["calls"] >= 2 and viewer["routed"] == viewer["calls"], viewer
    assert viewer["outcomes"].get("grpc routed", 0) >= 1, viewer
    # All the flood's answers but the burst and the refill are refusals (limit 5/s, burst 10):
    # 429 on /play, RESOURCE_EXHAUSTED on gRPC (Foghorn's own count of refused calls).
    allowed = 10 + 5 * (FLOOD_S + 2)
    assert play["status"]["3xx"] + grpc_side["routed"] <= allowed, result
    assert play["status"]["4xx"] >= play["done"] - allowed, result
    assert result["foghorn_limited"] >= grpc_side["done"] + play["done"] - allowed, result
    for node in nodes:
        node.close()
    await fog.close_channels()


async def test_a_refusal_says_when_to_come_back(small_fleet_foghorn: Foghorn) -> None:
    """Past the burst, gRPC refusals carry grpc-retry-pushback-ms and /play's 429 Retry-After."""
    fog = small_fleet_foghorn
    route = pb_grpc.RoutingStub(fog.channel()).RouteViewer
    codes: Counter[str] = Counter()
    pushback = ""
    for _ in range(15):  # over the burst of 10
        try:
            await route(pb.ViewerRouteRequest(content_id="live-1"), timeout=5)
            codes["ok"] += 1
        except grpc.aio.AioRpcError as exc:
            # (RESOURCE_EXHAUSTED is also "no eligible node": the nodes of the flood are gone.)
            limited = "too many routing requests" in (exc.details() or "")
            codes["limited" if limited else exc.code().name] += 1
            if limited:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                pushback = str(dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms"))
    assert codes["limited"] >= 1 and pushback.isdigit() and int(pushback) > 0, codes
    async with httpx.AsyncClient(base_url=fog.http) as client:
        replies = [await client.get("/play/live-1") for _ in range(15)]
    limited = [r for r in replies if r.status_code == 429]
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    await fog.close_channels()


async def test_one_addresss_redirects_cannot_make_a_node_ineligible(
    foghorn_factory: Callable[..., Foghorn],
) -> None:
    """A node with bandwidth headroom for 8 pending viewers (2.5 Mbps each): 30 /play redirects
    from one address, all within its rate limit, would make it ineligible for everyone if they
    all counted; capped at FOGHORN_REDIRECTS_PER_CLIENT (4), the next viewer is still sent."""
    fog = foghorn_factory(
        {"FOGHORN_ANON_ROUTES_PER_S": "1000", "FOGHORN_ANON_ROUTE_BURST": "1000"},
        name="fog-redirects",
    )
    node = RawNode(fog.channel(), sec.NODE_PARIS)
    await node.register("edge-paris-redir-0")
    report = report_msg(("live-2", "acme", 10))
    report.report.upload_bps, report.report.bandwidth_limit_bps = 80_000_000, 100_000_000
    node.send(report)

    async def reported() -> bool:
        return (await fog.nodes())["edge-paris-redir-0"]["cpu_percent"] is not None

    await eventually(reported, what="the node reporting")
    async with httpx.AsyncClient(base_url=fog.http) as flood_client:
        flood = [(await flood_client.get("/play/live-2")).status_code for _ in range(30)]
    transport = httpx.AsyncHTTPTransport(local_address=VIEWER_ADDRESS)
    async with httpx.AsyncClient(base_url=fog.http, transport=transport) as viewer:
        assert (await viewer.get("/play/live-2")).status_code == 302
    assert flood == [302] * 30
    node.close()
    await fog.close_channels()


async def test_an_authenticated_caller_is_not_limited_per_address(
    small_fleet_foghorn: Foghorn,
) -> None:
    fog = small_fleet_foghorn
    nodes = await _nodes(fog)
    route = pb_grpc.RoutingStub(fog.channel()).RouteViewer
    for _ in range(50):  # over the anonymous burst of 10: Bridge routes for many viewers
        await route(pb.ViewerRouteRequest(content_id="live-1"), metadata=sec.auth(sec.OPS))
    for node in nodes:
        node.close()
    await fog.close_channels()
