"""End to end: a GraphQL subscription through Bridge relays a real Signalman's tenant events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys

import pytest
import websockets

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.servers import free_port
from pkg.events.sink import Event
from tests.bridge.fakes import SECRET, token

pytestmark = pytest.mark.integration

SUB = 'subscription { tenantEvents(channels: ["nodes"]) { type tenant data channel } }'


@contextlib.asynccontextmanager
async def subscribed(port: int, tok: str, query: str = SUB):
    url = f"ws://127.0.0.1:{port}/graphql"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {tok}"}}
        await ws.send(json.dumps(init))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
        yield ws


async def next_payload(ws, timeout: float):
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] == "ping":
            await ws.send(json.dumps({"type": "pong"}))
            continue
        return msg


async def test_tenant_events_reach_their_tenant_and_no_other(process_factory):
    grpc_port = free_port()
    process_factory(
        "signalman",
        [sys.executable, "-m", "api_realtime", "--grpc-port", str(grpc_port),
         "--http-port", str(free_port()), "--replica-id", "sig-1"],
        env={"PLATFORM_TOKENS": "sig-acme=bridge@acme:tenant-user,"
             "sig-globex=bridge@globex:tenant-user,pub-acme=pub:system"},
        port=grpc_port,
    )  # fmt: skip
    bridge = process_factory(
        "bridge",
        [sys.executable, "-m", "api_gateway", "--port", "{port}", "--id", "sub-1"],
        env={
            "BRIDGE_JWT_HS256_SECRET": SECRET,
            "BRIDGE_SIGNALMAN_ADDRESSES": f"127.0.0.1:{grpc_port}",
            "BRIDGE_SIGNALMAN_TOKENS": "acme=sig-acme,globex=sig-globex",
        },
    )
    publisher = SignalmanClient([f"127.0.0.1:{grpc_port}"], token="pub-acme")
    try:
        async with (
            subscribed(bridge.port, token("acme")) as acme,
            subscribed(bridge.port, token("globex")) as globex,
        ):
            received = None
            for attempt in range(20):  # the relay subscribes asynchronously: publish until seen
                event = Event(type="node.registered", tenant="acme", data={"n": attempt})
                await publisher.publish([json.dumps(dataclasses.asdict(event))])
                with contextlib.suppress(TimeoutError):
                    received = await next_payload(acme, 0.5)
                    break
            assert received is not None, "no event relayed"
            assert received["type"] == "next", received
            got = received["payload"]["data"]["tenantEvents"]
            assert (got["type"], got["tenant"], got["channel"]) == (
                "node.registered",
                "acme",
                "nodes",
            )
            assert "n" in json.loads(got["data"])
            with pytest.raises(TimeoutError):
                await next_payload(globex, 1.0)  # another tenant sees nothing
    finally:
        await publisher.close()


async def test_a_tenant_without_a_signalman_credential_gets_a_clear_error(process_factory):
    bridge = process_factory(
        "bridge",
        [sys.executable, "-m", "api_gateway", "--port", "{port}", "--id", "sub-2"],
        env={
            "BRIDGE_JWT_HS256_SECRET": SECRET,
            "BRIDGE_SIGNALMAN_ADDRESSES": "127.0.0.1:1",
            "BRIDGE_SIGNALMAN_TOKENS": "acme=sig-acme",
        },
    )
    async with subscribed(bridge.port, token("initech")) as ws:
        msg = await next_payload(ws, 10)
        errors = msg["payload"] if msg["type"] == "error" else msg["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "SUBSCRIPTIONS_UNAVAILABLE"
