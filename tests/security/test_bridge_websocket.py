"""Bridge's WebSocket path has the limits of its HTTP path (issue 12, item 6), checked with a raw
``websockets`` client against a real Bridge, Foghorn and Signalman.

Every operation on a socket is charged to the caller's rate limit; the HTTP size limits apply to
frames and queries; parse and limit errors come back as GraphQL errors (one log line, no
traceback quoting the query); a socket is closed 4401 when its token expires unless the client
re-authenticates; a tenant's subscriptions are capped (non-retryable error) and share one
Signalman stream. An operation the access map refuses gets an ``error`` message for its id,
the socket stays open, and nothing ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.bridge.fakes import token
from tests.bridge.stack import edge_nodes
from tests.interfaces.conftest import OPERATOR_TOKEN, Platform
from tests.waiting import eventually

pytestmark = pytest.mark.integration
PROTOCOL = "graphql-transport-ws"
SUB = 'subscription { tenantEvents(channels: ["%s"]) { type } }'


@contextlib.asynccontextmanager
async def socket(port: int, tok: str | None = None) -> AsyncIterator[Any]:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/graphql", subprotocols=[PROTOCOL], max_size=None
    ) as ws:
        payload = {"Authorization": f"Bearer {tok}"} if tok else {}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        yield ws


async def reply(ws: Any, op_id: str, timeout: float = 10) -> dict[str, Any]:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg.get("id") == op_id:
            return msg  # type: ignore[no-any-return]


async def run(ws: Any, op_id: str, query: str) -> dict[str, Any]:
    await ws.send(json.dumps({"id": op_id, "type": "subscribe", "payload": {"query": query}}))
    return await reply(ws, op_id)


async def closed_with(ws: Any, timeout: float = 10) -> tuple[int, str]:
    """Read (and drop) messages until the server closes the socket: its code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def code_of(msg: dict[str, Any]) -> str:
    errors = msg["payload"] if msg["type"] == "error" else msg["payload"].get("errors", [{}])
    return str(errors[0].get("extensions", {}).get("code"))


async def test_every_operation_on_a_socket_is_charged_to_the_rate_limit(extra_bridge) -> None:  # type: ignore[no-untyped-def]
    port = extra_bridge(BRIDGE_TENANT_BURST="4", BRIDGE_TENANT_RATE="0.1")
    async with socket(port, token("acme")) as ws:
        answers = [await run(ws, str(i), "{ me { tenant } }") for i in range(5)]
    assert [a["type"] for a in answers[:4]] == ["next"] * 4
    assert answers[4]["type"] == "error" and code_of(answers[4]) == "RATE_LIMITED"
    assert 1 <= answers[4]["payload"][0]["extensions"]["retryAfter"] <= 10  # one token: <= 10 s
    # The same bucket as HTTP: the tenant's next HTTP request is refused too.
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"http://127.0.0.1:{port}/graphql",
            json={"query": "{ me { tenant } }"},
            headers={"Authorization": f"Bearer {token('acme')}"},
        )
    assert r.status_code == 429


async def test_http_size_limits_apply_to_frames_and_queries(extra_bridge) -> None:  # type: ignore[no-untyped-def]
    port = extra_bridge(BRIDGE_MAX_BODY_BYTES="8192", BRIDGE_MAX_QUERY_BYTES="1024")
    async with socket(port, token("acme")) as ws:
        big_query = "{ me { tenant } }" + " " * 2000
        refused = await run(ws, "1", big_query)
        assert refused["type"] == "error" and code_of(refused) == "PAYLOAD_TOO_LARGE"
        assert (await run(ws, "2", "{ me { tenant } }"))["type"] == "next"  # still open
        payload = {"query": "{ me { tenant } }", "padding": "y" * 20_000}
        await ws.send(json.dumps({"id": "3", "type": "subscribe", "payload": payload}))
        code, _ = await closed_with(ws)
    assert code == 1009  # message too big


async def test_parse_and_limit_errors_are_graphql_errors_without_a_traceback(extra_bridge) -> None:  # type: ignore[no-untyped-def]
    port = extra_bridge(BRIDGE_MAX_QUERY_TOKENS="50", BRIDGE_MAX_QUERY_DEPTH="2")
    secret = "SECRET_MARKER_IN_QUERY"
    names = " name" * 60
    cases = {
        f"{{ me {{ {secret} ": "GRAPHQL_PARSE_FAILED",
        f"{{ me {{ {names} }} }}": "QUERY_TOO_LARGE",
        f'{{ route(contentId: "x") {{ best {{ urls {{ url }} }} }} {secret}: me {{ name }} }}':
            "QUERY_TOO_DEEP",
        f"query Q {{ me {{ name }} }} query R {{ me {{ name }} }} # {secret}":
            "OPERATION_NAME_REQUIRED",
    }  # fmt: skip
    async with socket(port, token("acme")) as ws:
        for i, (query, code) in enumerate(cases.items()):
            msg = await run(ws, str(i), query)
            assert msg["type"] == "error" and code_of(msg) == code, (query, msg)
        assert (await run(ws, "ok", "{ me { tenant } }"))["type"] == "next"  # still open
    log = extra_bridge.procs[0].log_path.read_text()
    assert "Traceback" not in log and secret not in log


async def test_a_socket_is_closed_when_its_token_expires_unless_reauthenticated(
    platform: Platform,
    extra_bridge,  # type: ignore[no-untyped-def]
) -> None:
    port = extra_bridge(BRIDGE_JWT_LEEWAY_S="0")
    before = await _signalman_subscribers(platform)
    started = time.monotonic()
    async with socket(port, token("acme", exp_in=4)) as ws:
        # A live subscription does not keep the socket, nor its stream, past the token.
        await ws.send(
            json.dumps({"id": "s", "type": "subscribe", "payload": {"query": SUB % "all"}})
        )
        await subscribers_become(platform, before + 1)
        assert await closed_with(ws) == (4401, "token expired")
    assert time.monotonic() - started < 15  # at its expiry (4 s), not at some later cleanup
    await subscribers_become(platform, before)  # Bridge's stream to Signalman ended with it
    # A fresh token in a ping's payload keeps the socket open past the first one's expiry.
    async with socket(port, token("acme", exp_in=2)) as ws:
        fresh = {"Authorization": f"Bearer {token('acme', exp_in=60)}"}
        await ws.send(json.dumps({"type": "ping", "payload": fresh}))
        assert json.loads(await ws.recv())["type"] == "pong"
        await asyncio.sleep(3)
        assert (await run(ws, "1", "{ me { tenant } }"))["type"] == "next"
        # ... but not with another tenant's token.
        other = {"Authorization": f"Bearer {token('globex', exp_in=60)}"}
        await ws.send(json.dumps({"type": "ping", "payload": other}))
        assert await closed_with(ws) == (4403, "invalid token: it is for another tenant")


async def _signalman_subscribers(platform: Platform) -> int:
    async with httpx.AsyncClient() as http:
        # The full health report (subscriber counts) is for operators (docs/security.md).
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        url = f"http://127.0.0.1:{platform.signalman_http}/health"
        health = (await http.get(url, headers=headers)).json()
    return int(health["subscribers"])


async def subscribers_become(platform: Platform, count: int) -> None:
    async def reached() -> bool:
        return await _signalman_subscribers(platform) == count

    await eventually(reached, timeout=5, interval=0.1, what=f"{count} Signalman subscribers")


async def test_a_tenants_subscriptions_share_one_stream_and_are_capped(
    platform: Platform,
    extra_bridge,  # type: ignore[no-untyped-def]
) -> None:
    port = extra_bridge(BRIDGE_MAX_SUBSCRIPTIONS_PER_TENANT="3")
    before = await _signalman_subscribers(platform)
    async with socket(port, token("acme")) as a, socket(port, token("acme")) as b:
        for ws, op_id, channel in ((a, "1", "streams"), (a, "2", "nodes"), (b, "3", "all")):
            await ws.send(json.dumps({"id": op_id, "type": "subscribe",
                                      "payload": {"query": SUB % channel}}))  # fmt: skip
        await subscribers_become(platform, before + 1)
        await asyncio.sleep(0.5)  # no second stream shows up either
        assert await _signalman_subscribers(platform) == before + 1
        refused = await run(b, "4", SUB % "routing")
        assert code_of(refused) == "SUBSCRIPTION_LIMIT", refused
        errors = refused["payload"] if refused["type"] == "error" else refused["payload"]["errors"]
        assert errors[0]["extensions"]["retryable"] is False
        # Another tenant has its own cap and its own stream.
        async with socket(port, token("globex")) as g:
            await g.send(
                json.dumps({"id": "g", "type": "subscribe", "payload": {"query": SUB % "all"}})
            )
            await subscribers_become(platform, before + 2)


async def test_a_forbidden_operation_on_a_socket_is_an_error_for_its_id_and_changes_nothing(
    platform: Platform,
) -> None:
    """graphql-transport-ws: an operation refused before execution is an ``error`` message
    (the protocol's "operation execution error(s)"), not a closed socket."""
    mutation = 'mutation { setNodeMode(nodeId: "ws-n1", mode: MAINTENANCE) { ok } }'
    operator = token("ops", ["operator"])
    async with edge_nodes(platform.foghorn_grpc, ["ws-n1"]):
        async with socket(platform.bridge_port, operator) as ws:
            assert await node_mode(ws, "ws-n1") == "NORMAL"
        async with socket(platform.bridge_port, token("acme", ["admin"])) as ws:
            refused = await run(ws, "m1", mutation)
            assert refused["type"] == "error" and code_of(refused) == "FORBIDDEN", refused
            assert "setNodeMode needs the 'operator' role" in refused["payload"][0]["message"]
            listing = await run(ws, "q1", "{ me { tenant } nodes { id } }")
            assert listing["type"] == "error" and code_of(listing) == "FORBIDDEN", listing
            # The socket is still open and serves what the caller may do.
            me = await run(ws, "q2", "{ me { tenant } }")
            assert me["type"] == "next" and me["payload"] == {"data": {"me": {"tenant": "acme"}}}
        async with socket(platform.bridge_port) as ws:  # anonymous
            sub = await run(ws, "s1", SUB % "live")
            assert sub["type"] == "error" and code_of(sub) == "UNAUTHENTICATED", sub
        async with socket(platform.bridge_port, operator) as ws:
            assert await node_mode(ws, "ws-n1") == "NORMAL"  # setNodeMode would invalidate it


async def node_mode(ws: Any, node_id: str) -> str:
    """The node's mode as an operator sees it, once it has registered (at most 10 s)."""
    for i in range(50):
        seen = await run(ws, f"mode-{i}", f'{{ node(id: "{node_id}") {{ mode }} }}')
        node = seen["payload"]["data"]["node"]
        if node is not None:
            return str(node["mode"])
        await asyncio.sleep(0.2)  # not registered yet (a miss is cached 2 s)
    raise AssertionError(f"{node_id} never registered")
