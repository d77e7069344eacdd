"""Whole answers of repeated queries (bridge.answers) through Bridge's HTTP view, in process
(embedded stores), and the answer cache's own rules on a fake clock."""

from __future__ import annotations

import hashlib

import pytest

from api_gateway.fastpath import answer_key
from bridge.answers import AnswerCache, Read, decode, encode
from bridge.ratelimit import RateLimiter
from bridge.store.memory import MemoryAnswerStore, MemoryBucketStore, MemoryCacheStore
from bridge.token_bucket import Limit
from pkg.common.auth import Principal
from pkg.common.clock import FakeClock
from tests.bridge.fakes import token
from tests.bridge.test_gateway_http import NODE_Q, codes, gql, make_client

ROUTE_Q = "query R($c: String!) { route(contentId: $c) { best { nodeId } } me { tenant } }"


@pytest.fixture
def bridge():
    client, fleet = make_client()
    with client:
        client.fleet = fleet
        yield client


def _app_answers(client) -> AnswerCache:
    """The answer cache of the view behind a TestClient's app."""
    view = client.app.view  # api_gateway.http.GraphQLRoute
    assert view.answers is not None
    return view.answers


def test_a_repeated_query_is_answered_from_its_kept_answer(bridge):
    tok = token(roles=["operator"])
    kept = _app_answers(bridge)
    first = gql(bridge, NODE_Q, {"id": "n1"}, tok=tok)
    assert first.status_code == 200 and kept.stored == 1 and kept.hits == 0
    again = gql(bridge, NODE_Q, {"id": "n1"}, tok=tok)
    assert again.status_code == 200 and again.json() == first.json()
    assert kept.hits == 1  # answered before any GraphQL machinery ran
    assert {"x-ratelimit-limit", "x-ratelimit-remaining"} <= set(again.headers)
    assert again.headers["content-type"].startswith("application/json")
    media = "application/graphql-response+json"
    spec = gql(bridge, NODE_Q, {"id": "n1"}, tok=tok, headers={"Accept": media})
    assert spec.headers["content-type"].startswith(media)
    assert bridge.fleet.calls["get_node"] == 1
    ops = {"Authorization": f"Bearer {token(roles=['operator'])}"}  # operators only
    text = bridge.get("/metrics", headers=ops).text
    assert 'bridge_answer_cache_requests_total{result="hit"}' in text
    assert 'bridge_ratelimit_decisions_total{decision="allowed",mode="local"}' in text
    assert 'bridge_http_responses_total{code="OK",status="200"}' in text


def test_kept_answers_are_per_caller_and_per_variables(bridge):
    acme, globex = token("acme"), token("globex")
    assert gql(bridge, ROUTE_Q, {"c": "live/1"}, tok=acme).json()["data"]["me"]["tenant"] == "acme"
    assert gql(bridge, ROUTE_Q, {"c": "live/1"}, tok=acme).json()["data"]["me"]["tenant"] == "acme"
    other = gql(bridge, ROUTE_Q, {"c": "live/1"}, tok=globex).json()
    assert other["data"]["me"]["tenant"] == "globex"
    anonymous = gql(bridge, ROUTE_Q, {"c": "live/1"}).json()
    assert anonymous["data"]["me"]["tenant"] is None
    assert _app_answers(bridge).hits == 1
    gql(bridge, ROUTE_Q, {"c": "live/2"}, tok=acme)
    assert _app_answers(bridge).hits == 1  # other variables: another answer


def test_a_kept_answer_is_not_served_after_its_tags_are_invalidated(bridge):
    operator = token(roles=["operator"])
    for _ in range(2):
        assert gql(bridge, NODE_Q, {"id": "n1"}, tok=operator).json()["data"]["node"]["mode"] == (
            "NORMAL"
        )
    assert _app_answers(bridge).hits == 1
    m = 'mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }'
    assert gql(bridge, m, tok=operator).json()["data"]["setNodeMode"]["ok"] is True
    after = gql(bridge, NODE_Q, {"id": "n1"}, tok=operator).json()
    assert after["data"]["node"]["mode"] == "DRAINING"
    assert _app_answers(bridge).hits == 1


def test_answers_with_errors_or_of_mutations_are_never_kept(bridge):
    viewer = token(roles=[])
    for _ in range(3):
        assert codes(gql(bridge, "{ nodes { id } }", tok=viewer)) == ["FORBIDDEN"]
    m = 'mutation { invalidateCache(tags: ["routing"]) }'
    operator = token(roles=["operator"])
    for _ in range(2):
        assert gql(bridge, m, tok=operator).json()["data"]["invalidateCache"] == ["routing"]
    # Caller-only fields read no cache entry: nothing to invalidate them by, nothing kept.
    for _ in range(2):
        gql(bridge, "{ me { tenant } }", tok=viewer)
    kept = _app_answers(bridge)
    assert (kept.stored, kept.hits) == (0, 0)


def test_a_kept_answer_still_charges_the_callers_bucket():
    client, _ = make_client(tenant_burst=3, tenant_rate=0.01)
    with client:
        tok = token("small")
        statuses = [gql(client, ROUTE_Q, {"c": "live/1"}, tok=tok).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert _app_answers(client).hits == 2
        # The same bucket as every other request of the tenant.
        assert gql(client, "{ me { tenant } }", tok=tok).status_code == 429


def test_a_negative_answer_is_kept_for_the_negative_lifetime(bridge):
    tok = token(roles=["operator"])
    for _ in range(3):
        assert gql(bridge, NODE_Q, {"id": "ghost"}, tok=tok).json() == {"data": {"node": None}}
    assert bridge.fleet.calls["get_node"] == 1 and _app_answers(bridge).hits == 2


def test_a_persisted_hash_finds_the_answer_of_its_query(bridge):
    query = '{ route(contentId: "live/apq") { best { nodeId } } }'
    digest = hashlib.sha256(query.encode()).hexdigest()
    ext = {"persistedQuery": {"version": 1, "sha256Hash": digest}}
    first = bridge.post("/graphql", json={"query": query, "extensions": ext})
    again = bridge.post("/graphql", json={"extensions": ext})
    assert again.json() == first.json() and _app_answers(bridge).hits == 1
    # A hash that is not the query's is the full path's 400, not someone else's answer.
    wrong = bridge.post("/graphql", json={"query": "{ me { tenant } }", "extensions": ext})
    assert wrong.status_code == 400


def test_the_answer_cache_can_be_turned_off():
    client, fleet = make_client(answer_cache=False)
    with client:
        tok = token(roles=["operator"])
        for _ in range(3):
            assert gql(client, NODE_Q, {"id": "n1"}, tok=tok).status_code == 200
        assert fleet.calls["get_node"] == 1  # the response cache still answers


# -- the answer cache's rules, on a fake clock ---------------------------------------------------
def _cache(clock: FakeClock, rand: float = 1.0) -> tuple[AnswerCache, MemoryCacheStore]:
    buckets, tags = MemoryBucketStore(clock), MemoryCacheStore(clock)
    store = MemoryAnswerStore(buckets, tags, clock)
    return AnswerCache(store, RateLimiter(None, buckets), clock=clock, rand=lambda: rand), tags


LIMIT = Limit(capacity=100, rate=1.0)


async def test_an_answer_lives_until_its_earliest_entry_stops_being_fresh():
    clock = FakeClock()
    cache, _ = _cache(clock)
    now = clock.time()
    reads = [Read(("routing",), (0,), now + 5, 0.01), Read(("nodes",), (0,), now + 2, 0.01)]
    assert await cache.remember("k", b'{"data":1}', reads)
    assert (await cache.admit("tenant:a", LIMIT, "k"))[1] == b'{"data":1}'
    clock.advance(2.5)  # the response cache now serves stale and refreshes: the query runs
    assert (await cache.admit("tenant:a", LIMIT, "k"))[1] is None


async def test_an_answer_with_a_bumped_tag_is_a_miss():
    clock = FakeClock()
    cache, tags = _cache(clock)
    await cache.remember("k", b"x", [Read(("tenant:acme",), (0,), clock.time() + 5, 0.0)])
    await tags.bump(["tenant:acme"])
    assert (await cache.admit("tenant:a", LIMIT, "k"))[1] is None


async def test_stale_or_disagreeing_reads_keep_nothing():
    clock = FakeClock()
    cache, _ = _cache(clock)
    now = clock.time()
    assert not await cache.remember("k", b"x", [Read(("a",), (0,), 0.0, 0.0)])
    disagree = [Read(("a",), (1,), now + 5, 0.0), Read(("a",), (2,), now + 5, 0.0)]
    assert not await cache.remember("k", b"x", disagree)
    assert not await cache.remember("k", b"x", [])


async def test_an_answer_near_expiry_is_sometimes_run_again_for_an_early_refresh():
    clock = FakeClock()
    cache, _ = _cache(clock, rand=1e-9)  # the XFetch draw that always refreshes early
    await cache.remember("k", b"x", [Read((), (), clock.time() + 1, 0.5)])
    assert (await cache.admit("tenant:a", LIMIT, "k"))[1] is None
    assert cache.misses == 1


async def test_a_refused_request_reads_no_answer():
    clock = FakeClock()
    cache, _ = _cache(clock)
    await cache.remember("k", b"x", [Read((), (), clock.time() + 5, 0.0)])
    one = Limit(capacity=1, rate=0.001)
    assert (await cache.admit("ip:1", one, "k"))[1] == b"x"
    decision, body = await cache.admit("ip:1", one, "k")
    assert not decision.allowed and body is None


def test_answer_keys_separate_callers_documents_operations_and_variables():
    acme = Principal("u", "acme", frozenset({"user"}))
    body = {"query": "{ a }", "variables": {"x": 1}, "operationName": None}
    base = answer_key(acme, body)
    assert base is not None and base == answer_key(acme, dict(body))
    assert answer_key(Principal("u", "globex", frozenset({"user"})), body) != base
    assert answer_key(Principal("u", "acme", frozenset({"admin"})), body) != base
    assert answer_key(Principal("v", "acme", frozenset({"user"})), body) != base
    assert answer_key(acme, {**body, "variables": {"x": 2}}) != base
    assert answer_key(acme, {**body, "operationName": "A"}) != base
    assert answer_key(acme, {**body, "query": "{ b }"}) != base
    assert answer_key(acme, [body]) is None  # batches take the full path
    assert answer_key(acme, {"variables": {}}) is None


def test_a_corrupt_stored_answer_is_a_miss():
    assert decode(b"no header") is None and decode(b"x y\nbody") is None
    assert decode(encode(b"body", 12.5, 0.25)) == (b"body", 12.5, 0.25)
