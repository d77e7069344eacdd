"""GraphQL over WebSocket with the clients people use: Python ``gql`` (graphql-transport-ws over
websockets) and the reference ``graphql-ws`` client in node, against real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gql import Client, gql
from gql.transport.exceptions import TransportConnectionFailed, TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from pkg.clients.signalman import SignalmanClient
from pkg.devstack import install
from pkg.events.sink import Event
from tests.bridge.fakes import token
from tests.interfaces.conftest import Platform

pytestmark = pytest.mark.integration

SUB = 'subscription { tenantEvents(channels: ["streams"]) { channel type tenant data } }'
NODE_CLIENT = Path(__file__).parent / "node" / "graphql_ws_client.cjs"


def transport(url: str, tok: str | None = None, **kw: Any) -> WebsocketsTransport:
    return WebsocketsTransport(
        url=url,
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
        init_payload={"Authorization": f"Bearer {tok}"} if tok else {},
        **kw,
    )


async def publish_until(
    platform: Platform, done: asyncio.Future[Any], tenant: str = "acme"
) -> None:
    """Publish a stream event for ``tenant`` every 0.2 s until ``done`` (subscriptions start
    asynchronously: events before that are not for them)."""
    pub = SignalmanClient([f"127.0.0.1:{platform.signalman_grpc}"], token=f"pub-{tenant}")
    try:
        n = 0
        while not done.done():
            event = Event("stream.started", tenant, {"stream_id": f"live-{n}"})
            await pub.publish([json.dumps(dataclasses.asdict(event))])
            n += 1
            await asyncio.sleep(0.2)
    finally:
        await pub.close()


async def test_gql_subscription_receives_its_tenants_events(platform: Platform) -> None:
    async with Client(transport=transport(platform.ws_url, token("acme"))) as session:
        received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def first() -> None:
            async for result in session.subscribe(gql(SUB)):
                received.set_result(result)
                return

        reader = asyncio.create_task(first())
        await asyncio.wait_for(publish_until(platform, received), 15)
        await reader
    event = received.result()["tenantEvents"]
    assert (event["channel"], event["type"], event["tenant"]) == (
        "streams",
        "stream.started",
        "acme",
    )


async def test_gql_sees_why_a_socket_is_refused(platform: Platform, extra_bridge) -> None:  # type: ignore[no-untyped-def]
    async def close_of(url: str, tok: str | None, **kw: Any) -> tuple[int, str]:
        with pytest.raises(TransportConnectionFailed) as failed:
            async with Client(transport=transport(url, tok, **kw)) as session:
                await session.execute(gql("{ me { name } }"))
        closed = failed.value.__cause__
        return closed.rcvd.code, closed.rcvd.reason  # type: ignore[union-attr]

    # In connection_init: expired (refresh it) is told apart from invalid (give up).
    assert await close_of(platform.ws_url, token(exp_in=-60)) == (4401, "token expired")
    code, reason = await close_of(
        platform.ws_url, token(secret="wrong-secret-wrong-secret-0123456789")
    )
    assert code == 4403 and reason == "invalid token: token signature invalid"
    # In the upgrade's Authorization header: the same codes and reasons.
    headers = {"Authorization": f"Bearer {token(exp_in=-60)}"}
    assert await close_of(platform.ws_url, None, headers=headers) == (4401, "token expired")
    # An exhausted rate limit: 4429 with when to retry (the socket and its query took 2).
    strict = extra_bridge(BRIDGE_ANON_BURST="2", BRIDGE_ANON_RATE="0.2")
    url = f"ws://127.0.0.1:{strict}/graphql"
    async with Client(transport=transport(url)) as session:
        assert await session.execute(gql("{ me { anonymous } }"))
    code, reason = await close_of(url, None)
    assert code == 4429 and re.fullmatch(r"rate limited: retry after [1-5] s", reason), reason


async def test_the_legacy_graphql_ws_subprotocol_is_refused_at_negotiation(
    platform: Platform,
) -> None:
    legacy = WebsocketsTransport(
        url=platform.ws_url, subprotocols=[WebsocketsTransport.APOLLO_SUBPROTOCOL]
    )
    with pytest.raises(TransportConnectionFailed) as failed:
        async with Client(transport=legacy) as session:
            await session.execute(gql("{ me { name } }"))
    refused = failed.value.__cause__.response  # type: ignore[union-attr]
    assert refused.status_code == 400
    body = json.loads(bytes(refused.body))
    assert body["errors"][0]["extensions"]["code"] == "BAD_REQUEST"
    assert "graphql-transport-ws" in body["errors"][0]["message"]


async def test_errors_over_websocket_carry_extensions_code(platform: Platform) -> None:
    async with Client(transport=transport(platform.ws_url, token("acme"))) as session:
        for query, code in (
            ("{ me { nope } }", "GRAPHQL_VALIDATION_FAILED"),
            ("query A { me { name } } query B { me { tenant } }", "OPERATION_NAME_REQUIRED"),
            ("{ nodes { id } }", "FORBIDDEN"),  # a tenant user is no operator
            ('subscription { tenantEvents(channels: ["system"]) { id } }', "BAD_USER_INPUT"),
        ):
            with pytest.raises(TransportQueryError) as failed:
                await session.execute(gql(query))
            assert failed.value.errors[0]["extensions"]["code"] == code, query  # type: ignore[index]


async def test_a_tenant_without_a_signalman_credential_is_told_so_at_subscribe(
    platform: Platform,
) -> None:
    async with Client(transport=transport(platform.ws_url, token("initech"))) as session:
        with pytest.raises(TransportQueryError) as failed:
            async for _ in session.subscribe(gql(SUB)):
                break
    error = failed.value.errors[0]  # type: ignore[index]
    assert error["extensions"]["code"] == "SUBSCRIPTIONS_UNAVAILABLE"
    assert "no Signalman credential" in error["message"] and "initech" in error["message"]


# -- the reference client in node -----------------------------------------------------------
async def _node(url: str, tok: str | None, query: str) -> asyncio.subprocess.Process:
    node = shutil.which("node")
    assert node, "node is not installed"
    env = dict(os.environ, NODE_PATH=str(install.node_clients()))
    return await asyncio.create_subprocess_exec(
        node, str(NODE_CLIENT), url, tok or "-", query,
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def _lines(proc: asyncio.subprocess.Process) -> AsyncIterator[dict[str, Any]]:
    assert proc.stdout is not None
    async for line in proc.stdout:
        yield json.loads(line)


async def _outcome(url: str, tok: str | None, query: str) -> dict[str, Any]:
    proc = await _node(url, tok, query)
    out = [line async for line in _lines(proc)]
    await proc.wait()
    return {k: v for line in out for k, v in line.items()}


async def test_node_graphql_ws_client_receives_subscription_events(platform: Platform) -> None:
    proc = await _node(platform.ws_url, token("acme"), SUB)
    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async for line in _lines(proc):
            if "next" in line or "error" in line or "timeout" in line:
                received.set_result(line)
                return

    reader = asyncio.create_task(read())
    await asyncio.wait_for(publish_until(platform, received), 20)
    await reader
    await proc.wait()
    event = received.result()["next"]["data"]["tenantEvents"]
    assert (event["channel"], event["tenant"]) == ("streams", "acme")


async def test_node_graphql_ws_client_sees_refusal_reasons_and_error_codes(
    platform: Platform,
) -> None:
    expired = await _outcome(platform.ws_url, token(exp_in=-60), "{ me { name } }")
    assert expired["error"] == {"code": 4401, "reason": "token expired"}
    invalid = await _outcome(platform.ws_url, "not.a.jwt", "{ me { name } }")
    assert invalid["error"]["code"] == 4403
    assert invalid["error"]["reason"].startswith("invalid token: ")
    errors = await _outcome(platform.ws_url, token("acme"), "{ me { nope } }")
    assert errors["error"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    ok = await _outcome(platform.ws_url, token("acme"), "{ me { tenant } }")
    assert ok["next"] == {"data": {"me": {"tenant": "acme"}}}
