"""Behind a load balancer: Foghorn's per-address routing limits follow X-Forwarded-For only from
the peers in FOGHORN_TRUSTED_PROXIES (the HTTP header on /play, the ``x-forwarded-for`` metadata
on gRPC), read right to left; from anyone else the header changes nothing.

Raw clients against a real process: the "balancer" is a client bound to 127.0.0.2 (httpx, and
gRPC spoken over httpx's HTTP/2: grpcio cannot choose its source address); direct callers come
from 127.0.0.1. Each bucket holds 2 calls and refills every 100 s, so a third call is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
import httpx
import pytest

from devtools.flood import grpc_frame
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc
from tests.security.conftest import Foghorn

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.2"
LIMITED = "too many routing requests"


@pytest.fixture(scope="module")
def proxied_foghorn(foghorn_factory: Callable[..., Foghorn]) -> Foghorn:
    return foghorn_factory(
        {
            "FOGHORN_TRUSTED_PROXIES": f"{BALANCER}/32",
            "FOGHORN_ANON_ROUTES_PER_S": "0.01",
            "FOGHORN_ANON_ROUTE_BURST": "2",
        },
        name="fog-proxied",
    )


async def _play(client: httpx.AsyncClient, forwarded: str | None) -> bool:
    """One /play; True when it was admitted (anything but 429: there are no nodes here)."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return (await client.get("/play/live-1", headers=headers)).status_code != 429


async def test_play_behind_a_trusted_balancer_limits_each_client_on_its_own(
    proxied_foghorn: Foghorn,
) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=BALANCER)
    async with httpx.AsyncClient(base_url=proxied_foghorn.http, transport=transport) as lb:
        assert [await _play(lb, "203.0.113.1") for _ in range(3)] == [True, True, False]
        assert await _play(lb, "203.0.113.2")  # another viewer behind the balancer
        # A viewer writing the header itself: the balancer appends the real address (right).
        assert not await _play(lb, "198.51.100.77, 203.0.113.1")
        # Without the header the balancer's own address is the client.
        assert await _play(lb, None)


async def test_a_direct_caller_cannot_escape_its_limit_with_the_header(
    proxied_foghorn: Foghorn,
) -> None:
    async with httpx.AsyncClient(base_url=proxied_foghorn.http) as direct:  # from 127.0.0.1
        admitted = [await _play(direct, f"203.0.113.{50 + i}") for i in range(3)]
    assert admitted == [True, True, False]


async def _raw_route(client: httpx.AsyncClient, forwarded: str) -> bool:
    """RouteViewer as raw gRPC from the balancer's address; True unless rate limited."""
    reply = await client.post(
        "/foghorn.v1.Routing/RouteViewer",
        content=grpc_frame(pb.ViewerRouteRequest(content_id="live-1").SerializeToString()),
        headers={"content-type": "application/grpc", "te": "trailers",
                 "x-forwarded-for": forwarded},
    )  # fmt: skip
    return LIMITED not in reply.headers.get("grpc-message", "")


async def test_grpc_routing_follows_the_metadata_only_from_a_trusted_balancer(
    proxied_foghorn: Foghorn,
) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=BALANCER, http1=False, http2=True)
    base = f"http://{proxied_foghorn.target}"
    async with httpx.AsyncClient(base_url=base, transport=transport) as lb:
        assert [await _raw_route(lb, "203.0.113.11") for _ in range(3)] == [True, True, False]
        assert await _raw_route(lb, "203.0.113.12")
        assert not await _raw_route(lb, "198.51.100.77, 203.0.113.11")

    # grpcio from 127.0.0.1, not a trusted proxy: the metadata is ignored.
    route = pb_grpc.RoutingStub(proxied_foghorn.channel()).RouteViewer
    admitted = []
    for i in range(3):
        try:
            await route(
                pb.ViewerRouteRequest(content_id="live-1"),
                metadata=(("x-forwarded-for", f"203.0.113.{60 + i}"),), timeout=5,
            )  # fmt: skip
            admitted.append(True)
        except grpc.aio.AioRpcError as exc:
            admitted.append(LIMITED not in (exc.details() or ""))
    await proxied_foghorn.close_channels()
    # The direct /play test may have spent 127.0.0.1's bucket already: never more than 2.
    assert admitted.count(True) <= 2 and admitted[-1] is False
