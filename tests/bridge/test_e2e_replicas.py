"""End to end: two Bridge processes, a real Foghorn with simulated edge nodes, real Redis."""

from __future__ import annotations

import asyncio
import secrets
import sys

import pytest

from pkg.devstack.servers import free_port
from tests.bridge.conftest import bridge_env
from tests.bridge.fakes import token
from tests.bridge.stack import FOGHORN_TOKEN, edge_nodes, gql, http_client, metric_sum, wait_for

pytestmark = [pytest.mark.integration]

ROUTE_Q = "query($c: String!) { route(contentId: $c) { best { nodeId } considered } }"
NODE_Q = "query($id: ID!) { node(id: $id) { id mode } }"
OPS = {"authorization": f"Bearer {FOGHORN_TOKEN}"}  # an operator's: the full /health


async def _viewer_routes(client, foghorn) -> float:
    # Foghorn counts every routing decision it makes (viewer routes are the only ones here).
    return await metric_sum(client, foghorn.metrics_url, "foghorn_routing_decisions_total")


async def _bridge_backend_calls(client, ports) -> float:
    total = 0.0
    for port in ports:
        url = f"http://127.0.0.1:{port}/metrics"
        total += await metric_sum(client, url, "bridge_cache_backend_calls_total")
    return total


async def test_concurrent_identical_queries_over_two_replicas_cost_one_foghorn_call(
    redis_server, foghorn, start_bridges, prefix
):
    ports = start_bridges(bridge_env(redis_server.url, prefix, foghorn.grpc_port))
    tok = token("acme")
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1", "n2"]):
        assert await wait_for(lambda: _routes_ok(client, ports[0], tok, 2), 30), _last_seen
        before = await _viewer_routes(client, foghorn)
        bridge_before = await _bridge_backend_calls(client, ports)
        content = f"live/{secrets.token_hex(4)}"  # a key nobody has cached
        responses = await asyncio.gather(
            *[gql(client, ports[i % 2], ROUTE_Q, {"c": content}, tok) for i in range(100)]
        )
        assert [r.status_code for r in responses] == [200] * 100
        assert "errors" not in responses[0].json(), responses[0].text
        bests = {r.json()["data"]["route"]["best"]["nodeId"] for r in responses}
        assert len(bests) == 1
        after = await _viewer_routes(client, foghorn)
        assert after - before == 1
        assert await _bridge_backend_calls(client, ports) - bridge_before == 1


async def _routes_ok(client, port, tok, nodes: int = 1) -> bool:
    """Foghorn routes, and knows ``nodes`` connected nodes (asked around the cache)."""
    r = await gql(client, port, ROUTE_Q, {"c": f"warm/{secrets.token_hex(4)}"}, tok)
    route = (r.json().get("data") or {}).get("route") if r.status_code == 200 else None
    ok = route is not None and route["best"] is not None and route["considered"] >= nodes
    if not ok:
        _last_seen[port] = r.text[:300]
    return ok


_last_seen: dict[int, str] = {}


async def test_set_node_mode_on_one_replica_is_seen_by_the_other_at_once(
    redis_server, foghorn, start_bridges, prefix
):
    a, b = start_bridges(bridge_env(redis_server.url, prefix, foghorn.grpc_port))
    viewer, admin = token("acme", ["operator"]), token("acme", ["operator"])
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1", "n2"]):
        assert await wait_for(lambda: _routes_ok(client, a, viewer, 2), 30), _last_seen
        first = await gql(client, b, NODE_Q, {"id": "n1"}, viewer)
        assert first.json()["data"]["node"]["mode"] == "NORMAL"  # now cached, TTL 30 s
        m = 'mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { node { mode } } }'
        changed = await gql(client, a, m, None, admin)
        assert "errors" not in changed.json(), changed.text
        assert changed.json()["data"]["setNodeMode"]["node"]["mode"] == "DRAINING"
        seen = await gql(client, b, NODE_Q, {"id": "n1"}, viewer)
        assert seen.json()["data"]["node"]["mode"] == "DRAINING"


async def test_an_unknown_node_is_null_on_both_replicas(
    redis_server, foghorn, start_bridges, prefix
):
    a, b = start_bridges(bridge_env(redis_server.url, prefix, foghorn.grpc_port))
    viewer = token("acme", ["operator"])
    async with http_client() as client:
        for port in (a, b, a):
            r = await gql(client, port, NODE_Q, {"id": "ghost"}, viewer)
            assert r.json() == {"data": {"node": None}}


async def test_rate_limit_is_exact_across_two_replicas(
    redis_server, foghorn, start_bridges, prefix
):
    env = bridge_env(
        redis_server.url, prefix, foghorn.grpc_port, BRIDGE_TENANT_LIMITS="limited=10/0.001"
    )
    ports = start_bridges(env)
    tok = token("limited")
    async with http_client() as client:
        responses = await asyncio.gather(
            *[gql(client, ports[i % 2], "{ me { tenant } }", None, tok) for i in range(30)]
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.headers["x-ratelimit-limit"] == "10"
        # The 31st, on either replica, is refused too.
        for port in ports:
            assert (await gql(client, port, "{ me { tenant } }", None, tok)).status_code == 429


@pytest.mark.failure
async def test_redis_stopped_mid_traffic_degrades_and_recovers(
    redis_factory, foghorn, start_bridges, prefix
):
    redis = redis_factory()
    ports = start_bridges(bridge_env(redis.url, prefix, foghorn.grpc_port))
    tok = token("acme")
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1"]):
        assert await wait_for(lambda: _routes_ok(client, ports[0], tok), 30), _last_seen

        async def health(port):
            return (await client.get(f"http://127.0.0.1:{port}/health", headers=OPS)).json()

        for p in ports:
            assert (await health(p))["status"] == "ok"
        redis.stop()
        for i in range(20):  # traffic keeps being answered while Redis is gone
            r = await gql(client, ports[i % 2], ROUTE_Q, {"c": f"x/{i}"}, tok)
            assert r.status_code == 200, r.text
            assert r.json()["data"]["route"]["best"]["nodeId"] == "n1"
        for p in ports:
            assert await wait_for(lambda p=p: _is(health(p), "status", "degraded"))
        redis.start()
        for p in ports:
            assert await wait_for(lambda p=p: _is(health(p), "status", "ok"), timeout=20)
        before = await _viewer_routes(client, foghorn)
        for i in range(4):
            r = await gql(client, ports[i % 2], ROUTE_Q, {"c": "after/redis"}, tok)
            assert r.status_code == 200
        assert await _viewer_routes(client, foghorn) - before == 1  # shared cache is back


async def _is(aw, key, value) -> bool:
    return (await aw).get(key) == value


@pytest.mark.failure
async def test_foghorn_down_answers_fast_errors_or_stale_cache(
    redis_server, foghorn, start_bridges, prefix
):
    env = bridge_env(
        redis_server.url, prefix, foghorn.grpc_port,
        BRIDGE_CACHE_TTL_S="0.5", BRIDGE_CACHE_STALE_S="60",
        BRIDGE_ROUTE_CACHE_TTL_S="0.5", BRIDGE_BACKEND_TIMEOUT_S="1.0",
    )  # fmt: skip
    ports = start_bridges(env)
    tok = token("acme", ["operator"])
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1"]):
        assert await wait_for(lambda: _routes_ok(client, ports[0], tok), 30), _last_seen
        nodes = await gql(client, ports[0], "{ nodes { id } }", None, tok)
        assert [n["id"] for n in nodes.json()["data"]["nodes"]] == ["n1"]
    foghorn.proc.kill()
    await asyncio.sleep(0.6)  # past the TTL: only a stale entry remains
    stale = await gql(client_ := http_client(), ports[1], "{ nodes { id } }", None, tok)
    assert [n["id"] for n in stale.json()["data"]["nodes"]] == ["n1"]
    codes, messages = [], []
    loop = asyncio.get_running_loop()
    for i in range(60):
        started = loop.time()
        r = await gql(client_, ports[i % 2], ROUTE_Q, {"c": f"down/{i}"}, tok)
        assert loop.time() - started < 5.0  # answered, not hung on a dead backend
        assert r.status_code == 200
        err = r.json()["errors"][0]
        codes.append(err["extensions"]["code"])
        messages.append(err["message"])
    assert set(codes) <= {"BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT"}
    # The breaker opened: later calls fail at once without trying the dead backend.
    assert any("circuit breaker" in m for m in messages[-10:]), messages[-3:]
    health = (await client_.get(f"http://127.0.0.1:{ports[0]}/health", headers=OPS)).json()
    assert health["status"] == "degraded"
    assert set(health["foghorn"]["breakers"].values()) & {"open", "half-open"}
    await client_.aclose()


async def test_huge_headers_are_refused_and_the_process_keeps_serving(start_bridges, prefix):
    (port,) = start_bridges({"BRIDGE_JWT_HS256_SECRET": "x" * 32}, count=1)
    async with http_client() as client:
        url = f"http://127.0.0.1:{port}/graphql"
        body = {"query": "{ me { anonymous } }"}
        for headers in (
            {"Authorization": "Bearer " + "A" * 200_000},
            {"X-Junk": "j" * 200_000},
            {f"X-H{i}": "v" * 100 for i in range(500)},
        ):
            try:
                resp = await client.post(url, json=body, headers=headers)
                assert 400 <= resp.status_code < 500, resp.status_code
            except Exception as exc:  # the server may also just close the connection
                assert "RemoteProtocolError" in repr(exc) or "ReadError" in repr(exc), repr(exc)
        ok = await client.post(url, json=body)
        assert ok.json() == {"data": {"me": {"anonymous": True}}}


@pytest.mark.failure
async def test_a_killed_replica_leaves_the_other_serving_and_rejoins_the_shared_cache(
    redis_server, foghorn, start_bridges, prefix
):
    ports = start_bridges(bridge_env(redis_server.url, prefix, foghorn.grpc_port))
    a_proc = start_bridges.procs[0]
    tok = token("acme")
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1"]):
        assert await wait_for(lambda: _routes_ok(client, ports[1], tok), 30), _last_seen
        a_proc.kill()  # SIGKILL mid-service: no goodbye
        for _ in range(10):
            r = await gql(client, ports[1], ROUTE_Q, {"c": "shared/after-kill"}, tok)
            assert r.status_code == 200 and r.json()["data"]["route"]["best"]["nodeId"] == "n1"
        before = await _viewer_routes(client, foghorn)
        a_proc.start()  # same port
        r = await gql(client, ports[0], ROUTE_Q, {"c": "shared/after-kill"}, tok)
        assert r.json()["data"]["route"]["best"]["nodeId"] == "n1"
        assert await _viewer_routes(client, foghorn) == before  # answered from the shared cache


async def test_every_query_answers_from_a_real_foghorn(
    redis_server, foghorn, start_bridges, prefix
):
    env = bridge_env(redis_server.url, prefix, foghorn.grpc_port, BRIDGE_CACHE_TTL_S="0.2",
                     BRIDGE_ROUTE_CACHE_TTL_S="0.2")  # fmt: skip
    (port,) = start_bridges(env, count=1)
    viewer, admin = token("acme", ["operator"]), token("acme", ["operator"])
    q = """query($c: String!) {
      nodes { id mode connected stale region latitude capacity load { cpuPercent ramMaxBytes } }
      node(id: "n2") { id baseUrl capabilities roles ownerReplica lastReportAgeS }
      route(contentId: $c, latitude: 50.1, longitude: 4.0, maxFallbacks: 1) {
        best { nodeId baseUrl urls { protocol url } score distanceKm region }
        fallbacks { nodeId } viewerLatitude considered
      }
      explainRoute(contentId: $c, latitude: 50.1, longitude: 4.0) {
        weights viewerLatitude
        nodes { nodeId eligible rejection reason score rank distanceKm parts { cpu geo } }
      }
    }"""
    async with http_client() as client, edge_nodes(foghorn.grpc_port, ["n1", "n2"]):
        assert await wait_for(lambda: _routes_ok(client, port, viewer, 2), 30), _last_seen
        data = (await gql(client, port, q, {"c": "live/all"}, viewer)).json()
        assert "errors" not in data, data
        d = data["data"]
        assert sorted(n["id"] for n in d["nodes"]) == ["n1", "n2"]
        assert all(n["connected"] and n["load"]["ramMaxBytes"] == 8e9 for n in d["nodes"])
        assert d["node"]["capabilities"] == ["hls"] and d["node"]["roles"] == ["edge"]
        assert d["route"]["best"]["nodeId"] == "n1"  # at 50.1 N: n1 (50 N) is nearest
        assert d["route"]["best"]["urls"] and d["route"]["fallbacks"][0]["nodeId"] == "n2"
        ranks = {n["nodeId"]: n["rank"] for n in d["explainRoute"]["nodes"]}
        assert ranks == {"n1": 1, "n2": 2}

        m = 'mutation { setNodeMode(nodeId: "n1", mode: MAINTENANCE) { node { mode } acked } }'
        set_mode = (await gql(client, port, m, None, admin)).json()
        assert set_mode["data"]["setNodeMode"] == {"node": {"mode": "MAINTENANCE"}, "acked": True}
        after = (await gql(client, port, q, {"c": "live/all"}, viewer)).json()["data"]
        assert after["route"]["best"]["nodeId"] == "n2"  # invalidated at once, n1 excluded
        n1 = next(n for n in after["explainRoute"]["nodes"] if n["nodeId"] == "n1")
        assert (n1["eligible"], n1["rejection"], n1["rank"]) == (False, "MAINTENANCE", 0)


@pytest.mark.failure
async def test_bridge_fails_over_to_the_surviving_foghorn_replica(
    redis_server, redis_factory, process_factory, start_bridges, prefix
):
    foghorn_redis = redis_factory()  # Foghorn HA state, shared by its two replicas
    grpc_ports = [free_port(), free_port()]
    foghorns = [
        process_factory(
            f"foghorn-{i}",
            [sys.executable, "-m", "api_balancing", "--grpc-port", str(grpc_ports[i]),
             "--http-port", str(free_port()), "--replica-id", f"fog-{i}"],
            env={"PLATFORM_TOKENS": f"{FOGHORN_TOKEN}=bridge:operator|node;nodes=*;tenants=*,"
                                    "fog-relay=relay:replica",
                 "FOGHORN_REDIS_URL": foghorn_redis.url},
            port=grpc_ports[i],
        )
        for i in range(2)
    ]  # fmt: skip
    env = bridge_env(redis_server.url, prefix, grpc_ports[0], BRIDGE_ROUTE_CACHE_TTL_S="0.2")
    env["BRIDGE_FOGHORN_ADDRESSES"] = ",".join(f"127.0.0.1:{p}" for p in grpc_ports)
    (port,) = start_bridges(env, count=1)
    tok = token("acme")
    async with http_client() as client, edge_nodes(grpc_ports[1], ["n1"]):
        # Both Foghorn replicas know the node (it is connected to the second one).
        for _ in range(4):
            assert await wait_for(lambda: _routes_ok(client, port, tok), 30), _last_seen
        foghorns[0].kill()
        for i in range(10):
            r = await gql(client, port, ROUTE_Q, {"c": f"failover/{i}"}, tok)
            assert r.status_code == 200
            assert r.json()["data"]["route"]["best"]["nodeId"] == "n1", r.text
