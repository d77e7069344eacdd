"""Whole answers shared through a real redis-server by two replicas' stores: one script charges
the bucket and reads the answer, its tag versions compared in the same step."""

from __future__ import annotations

import asyncio

import pytest

from bridge.answers import AnswerCache, Read
from bridge.ratelimit import RateLimiter
from bridge.store.health import RedisHealth
from bridge.store.redis_store import RedisAnswerStore, RedisBucketStore, connect
from bridge.token_bucket import Limit
from pkg.devstack.servers import RedisServer

pytestmark = pytest.mark.integration

WIDE = Limit(capacity=1000, rate=1.0)


def answers_for(replica) -> AnswerCache:
    store = RedisAnswerStore(replica.client, replica.health, replica.cache_store.prefix)
    return AnswerCache(store, RateLimiter(replica.bucket_store), rand=lambda: 1.0)


async def test_an_answer_kept_by_one_replica_is_read_by_the_other(replicas):
    a, b = answers_for(replicas[0]), answers_for(replicas[1])
    reads = [Read(("routing", "tenant:acme"), (0, 0), a._clock.time() + 30, 0.01)]
    assert await a.remember("k", b'{"data":{"x":1}}', reads)
    decision, body = await b.admit("tenant:acme", WIDE, "k")
    assert decision.allowed and body == b'{"data":{"x":1}}'
    assert (await b.admit("tenant:acme", WIDE, "other"))[1] is None


async def test_a_tag_bumped_on_one_replica_retires_the_answer_on_the_other(replicas):
    a, b = answers_for(replicas[0]), answers_for(replicas[1])
    versions = tuple(await replicas[0].cache_store.tag_versions(["nodes", "node:n1"]))
    await a.remember("k", b"old", [Read(("nodes", "node:n1"), versions, a._clock.time() + 30, 0)])
    assert (await b.admit("tenant:acme", WIDE, "k"))[1] == b"old"
    await replicas[0].cache_store.bump(["node:n1"])
    assert (await b.admit("tenant:acme", WIDE, "k"))[1] is None


async def test_answers_and_plain_requests_share_one_exact_bucket(replicas):
    a, b = answers_for(replicas[0]), answers_for(replicas[1])
    await a.remember("k", b"x", [Read((), (), a._clock.time() + 30, 0)])
    limit = Limit(capacity=20, rate=0.001)  # no refill during the test
    plain = RateLimiter(replicas[1].bucket_store)
    results = await asyncio.gather(
        *[(a if i % 2 else b).admit("tenant:t", limit, "k") for i in range(30)],
        *[plain.check("tenant:t", limit) for _ in range(10)],
    )
    decisions = [r[0] if isinstance(r, tuple) else r for r in results]
    assert sum(d.allowed for d in decisions) == 20
    # A refused request read nothing; every admitted one got the answer.
    assert all((body is not None) == d.allowed for d, body in results[:30])


async def test_an_unreachable_redis_falls_back_to_the_local_limiter_and_reads_nothing(replicas):
    a = answers_for(replicas[0])
    await a.remember("k", b"x", [Read((), (), a._clock.time() + 30, 0)])
    replicas[0].health.mark_down(ConnectionError("test: down"))
    decision, body = await a.admit("tenant:acme", WIDE, "k")
    assert decision.allowed and not decision.exact and body is None


async def test_a_restarted_redis_is_reconnected_and_its_lost_script_reloaded(tmp_path):
    """The answer store holds its connections: a restart drops them and empties the script
    cache; the next requests reconnect (the client's one retry on a dropped socket) and reload
    the script, and every one is charged exactly once on the new server."""
    server = RedisServer(run_dir=tmp_path / "redis")
    server.start()
    client = connect(server.url, timeout_s=5.0)
    try:
        health = RedisHealth(client)
        store = RedisAnswerStore(client, health, "t")
        cache = AnswerCache(store, RateLimiter(RedisBucketStore(client, health, "t")))
        await cache.remember("k", b"x", [Read((), (), cache._clock.time() + 30, 0)])
        assert (await cache.admit("tenant:a", WIDE, "k"))[1] == b"x"
        server.restart()
        limit = Limit(capacity=5, rate=0.001)
        results = await asyncio.gather(*[cache.admit("tenant:a", limit, "k") for _ in range(8)])
        assert sum(d.allowed and d.exact for d, _ in results) == 5
        assert all(body is None for _, body in results)  # the restart lost the answer too
        assert health.up
    finally:
        await client.aclose()
        server.stop()
