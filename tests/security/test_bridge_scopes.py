"""Bridge scopes (issue 12, item 5), with raw httpx against a real Bridge, Foghorn, Signalman.

A tenant's ``admin`` administers its tenant, not the fleet: fleet mutations, fleet listings with
addresses and load, ``explainRoute`` and invalidation of global tags or another tenant's cache
need the platform ``operator`` role; each refusal is FORBIDDEN (HTTP 403, no data: refused before
execution, an admin naming another tenant's or a global tag too) and changes nothing. Cache keys
are injective: no choice of tenant or argument makes two different requests share an entry.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import pytest

from tests.bridge.fakes import token
from tests.bridge.stack import edge_nodes
from tests.interfaces.conftest import OPERATOR_TOKEN, Platform

pytestmark = pytest.mark.integration


def operator() -> str:
    return token("ops", ["operator"])


def acme_admin() -> str:
    return token("acme", ["admin"])


def acme_user() -> str:
    return token("acme", ["user"])


async def _gql(
    http: httpx.AsyncClient,
    p: Platform,
    query: str,
    tok: str | None,
    status: int = 200,
    accept: str = "application/json",
) -> Any:
    headers = {"Accept": accept, **({"Authorization": f"Bearer {tok}"} if tok else {})}
    r = await http.post(p.graphql_url, json={"query": query}, headers=headers)
    assert r.status_code == status, r.text
    if status in (401, 403):  # refused before execution: a request error, no data entry
        assert "data" not in r.json(), r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    return r.json()


def _codes(body: Any) -> list[str]:
    return [e["extensions"]["code"] for e in body.get("errors", [])]


async def _backend_calls(http: httpx.AsyncClient, p: Platform) -> float:
    reply = await http.get(  # /metrics is for operators
        p.metrics_urls()["bridge"], headers={"authorization": f"Bearer {OPERATOR_TOKEN}"}
    )
    reply.raise_for_status()
    text = reply.text
    m = re.search(r"^bridge_cache_backend_calls_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _routable(http: httpx.AsyncClient, p: Platform) -> None:
    """Wait until the test's node is routable (a fresh content id each time: no cached answer)."""
    for _ in range(100):
        query = f'{{ route(contentId: "warmup-{uuid.uuid4().hex}") {{ best {{ nodeId }} }} }}'
        body = await _gql(http, p, query, None)
        if body.get("data"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never routable: {body}")


async def test_fleet_listings_explain_and_mutations_need_the_operator_role(
    platform: Platform,
) -> None:
    queries = {
        "nodes": "{ nodes { id baseUrl load { cpuPercent } } }",
        "node": '{ node(id: "scope-n1") { id baseUrl } }',
        "explain": '{ explainRoute(contentId: "live-1") { weights } }',
        "mutation": 'mutation { setNodeMode(nodeId: "scope-n1", mode: DRAINING) { ok } }',
        "in a fragment": "mutation { me: __typename ...M } fragment M on Mutation "
        '{ setNodeMode(nodeId: "scope-n1", mode: DRAINING) { ok } }',
    }
    async with edge_nodes(platform.foghorn_grpc, ["scope-n1"]), httpx.AsyncClient() as http:
        await _routable(http, platform)
        for tok, status, code in ((acme_admin(), 403, "FORBIDDEN"),
                                  (acme_user(), 403, "FORBIDDEN"),
                                  (None, 401, "UNAUTHENTICATED")):  # fmt: skip
            for name, query in queries.items():
                for accept in ("application/json", "application/graphql-response+json"):
                    body = await _gql(http, platform, query, tok, status, accept)
                    assert _codes(body) == [code], (name, body)
                    assert "'operator' role" in body["errors"][0]["message"]
        # Nothing changed: the operator still sees the node in NORMAL mode...
        seen = await _gql(http, platform, '{ node(id: "scope-n1") { mode baseUrl } }', operator())
        assert seen["data"]["node"]["mode"] == "NORMAL" and seen["data"]["node"]["baseUrl"]
        # ... and may do each of these.
        for name, query in queries.items():
            body = await _gql(http, platform, query, operator())
            assert "errors" not in body, (name, body)
        drained = await _gql(http, platform, '{ node(id: "scope-n1") { mode } }', operator())
        assert drained["data"]["node"]["mode"] == "DRAINING"


async def test_a_tenant_admin_invalidates_only_its_own_tenant(platform: Platform) -> None:
    own = 'mutation { invalidateCache(tenant: "acme", tags: ["tenant:acme"]) }'
    refused = {
        "global tag": 'mutation { invalidateCache(tags: ["routing"]) }',
        "fleet tag": 'mutation { invalidateCache(tags: ["nodes"]) }',
        "other tenant": 'mutation { invalidateCache(tenant: "globex") }',
        "other tenant tag": 'mutation { invalidateCache(tags: ["tenant:globex"]) }',
        "own plus global": 'mutation { invalidateCache(tenant: "acme", tags: ["routing"]) }',
    }
    route = '{ route(contentId: "scope-live") { best { nodeId } } }'
    globex = token("globex", ["user"])
    async with edge_nodes(platform.foghorn_grpc, ["scope-n2"]), httpx.AsyncClient() as http:
        await _routable(http, platform)
        assert "errors" not in await _gql(http, platform, route, globex)  # cached for globex
        calls = await _backend_calls(http, platform)
        for name, mutation in refused.items():
            # The map admits an admin for its own tenant's tags only, read from the values
            # before execution: 403, no data, nothing invalidated.
            body = await _gql(http, platform, mutation, acme_admin(), 403)
            assert _codes(body) == ["FORBIDDEN"], (name, body)
            assert "may invalidate only tenant:acme" in body["errors"][0]["message"], name
        # A tenant user may not invalidate at all: refused before execution.
        assert _codes(await _gql(http, platform, own, acme_user(), 403)) == ["FORBIDDEN"]
        # Nothing was invalidated: globex's answer still comes from the cache.
        assert "errors" not in await _gql(http, platform, route, globex)
        assert await _backend_calls(http, platform) == calls
        ok = await _gql(http, platform, own, acme_admin())
        assert ok == {"data": {"invalidateCache": ["tenant:acme"]}}
        everything = await _gql(
            http, platform, 'mutation { invalidateCache(tags: ["routing"]) }', operator()
        )
        assert everything == {"data": {"invalidateCache": ["routing"]}}
        assert "errors" not in await _gql(http, platform, route, globex)
        assert await _backend_calls(http, platform) == calls + 1  # the operator's did


async def test_cache_keys_are_injective(platform: Platform) -> None:
    """Requests that differ only where a joined key would blur them each reach the backend."""
    pairs = [
        # viewerIp/protocol that a "|"-joined key made identical
        ('{ route(contentId: "inj", viewerIp: "10.0.0.1|x", protocol: "") { considered } }',
         '{ route(contentId: "inj", viewerIp: "10.0.0.1", protocol: "x|") { considered } }'),
    ]  # fmt: skip
    async with edge_nodes(platform.foghorn_grpc, ["scope-n3"]), httpx.AsyncClient() as http:
        await _routable(http, platform)
        for first, second in pairs:
            before = await _backend_calls(http, platform)
            await _gql(http, platform, first, None)
            await _gql(http, platform, second, None)
            assert await _backend_calls(http, platform) == before + 2
        # An anonymous caller and a tenant named "anonymous" do not share answers either.
        q = '{ route(contentId: "inj-anon") { considered } }'
        before = await _backend_calls(http, platform)
        await _gql(http, platform, q, None)
        await _gql(http, platform, q, token("anonymous"))
        assert await _backend_calls(http, platform) == before + 2
