"""Bridge stopped with SIGTERM (``BridgeApp.stop``) hands its work over: health answers 503 from
the first moment, a request in flight finishes with its answer, and an open WebSocket is closed
with 1012 (service restart), which graphql-ws clients answer by reconnecting elsewhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets

from api_gateway.config import BridgeConfig
from api_gateway.server import BridgeApp
from pkg.devstack.servers import free_port
from tests.bridge.fakes import SECRET, FakeEvents, FakeFleet, Json, token

pytestmark = pytest.mark.integration

ROUTE = '{ route(contentId: "live-1") { best { nodeId } } }'
SUB = 'subscription { tenantEvents(channels: ["nodes"]) { type } }'


class EndlessEvents(FakeEvents):
    """A subscription that stays open until the connection goes."""

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        self.subscribed.append((tenant, channels))
        await asyncio.Event().wait()
        yield {}


async def test_stop_answers_503_at_once_finishes_requests_and_closes_websockets_with_1012() -> None:
    port = free_port()
    events = EndlessEvents()
    app = BridgeApp(
        BridgeConfig(http_port=port, replica_id="b-stop", jwt_hs256_secret=SECRET),
        fleet=FakeFleet(delay=1.0),
        events=events,
    )
    await app.start()
    stopping: asyncio.Task[None] | None = None
    try:
        headers = {"Authorization": f"Bearer {token(roles=['user'])}"}
        url = f"http://127.0.0.1:{port}/graphql"
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/graphql", subprotocols=["graphql-transport-ws"]
        )
        init = {"type": "connection_init", "payload": {"Authorization": headers["Authorization"]}}
        await ws.send(json.dumps(init))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUB}}))
        async with httpx.AsyncClient(timeout=10.0) as http:
            in_flight = asyncio.create_task(http.post(url, json={"query": ROUTE}, headers=headers))
            while not events.subscribed or not app.fleet.calls.get("route_viewer"):  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(app.stop())
            await asyncio.sleep(0)
            assert app.health().http_status == 503  # not serving from the first moment
            reply = await in_flight  # the request in flight still gets its answer
        assert reply.status_code == 200, reply.text
        assert reply.json()["data"]["route"]["best"]["nodeId"] == "n1"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10.0)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await stopping
        with pytest.raises(httpx.ConnectError):  # nothing listens any more
            async with httpx.AsyncClient(timeout=2.0) as http:
                await http.get(f"http://127.0.0.1:{port}/health")
    finally:
        if stopping is None:
            await app.stop()
