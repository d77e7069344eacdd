"""Cache and rate limits shared through a real redis-server by two replicas' stores."""

from __future__ import annotations

import asyncio

import pytest

from bridge.cache import CachePolicy, NotFound, ResponseCache
from bridge.ratelimit import RateLimiter
from bridge.store.health import RedisHealth
from bridge.store.redis_store import RedisBucketStore, RedisCacheStore, connect
from bridge.token_bucket import Limit
from tests.waiting import eventually

pytestmark = pytest.mark.integration

POLICY = CachePolicy(ttl=30, stale=30, negative_ttl=5)


class CountingBackend:
    def __init__(self, delay: float = 0.05) -> None:
        self.calls = 0
        self.delay = delay
        self.value = {"nodes": 3}

    async def load(self) -> dict[str, int]:
        self.calls += 1
        await asyncio.sleep(self.delay)  # a real backend takes time: misses overlap
        return self.value


def cache_for(replica, **kw) -> ResponseCache:
    return ResponseCache(replica.cache_store, policy=POLICY, rand=lambda: 1.0, **kw)


async def test_concurrent_misses_across_two_replicas_cost_one_backend_call(replicas):
    backend = CountingBackend()
    a, b = cache_for(replicas[0]), cache_for(replicas[1])
    calls = [(a if i % 2 else b).get("overview", backend.load) for i in range(100)]
    results = await asyncio.gather(*calls)
    assert backend.calls == 1
    assert all(r.value == {"nodes": 3} for r in results)


async def test_an_entry_written_by_one_replica_is_a_hit_on_the_other(replicas):
    backend = CountingBackend(delay=0)
    a, b = cache_for(replicas[0]), cache_for(replicas[1])
    assert (await a.get("k", backend.load)).status == "miss"
    assert (await b.get("k", backend.load)).status == "hit"
    assert backend.calls == 1


async def test_invalidation_on_one_replica_is_seen_by_the_other_at_once(replicas):
    backend = CountingBackend(delay=0)
    # The in-process tier is on: it must not hide the invalidation either.
    a, b = cache_for(replicas[0], local_size=100), cache_for(replicas[1], local_size=100)
    await a.get("k", backend.load, tags=["tenant:acme"])
    assert (await b.get("k", backend.load, tags=["tenant:acme"])).status == "hit"
    backend.value = {"nodes": 4}
    await a.invalidate(["tenant:acme"])
    after = await b.get("k", backend.load, tags=["tenant:acme"])
    assert (after.status, after.value) == ("miss", {"nodes": 4})


async def test_negative_entries_are_shared_too(replicas):
    calls = 0

    async def missing() -> None:
        nonlocal calls
        calls += 1
        raise NotFound()

    a, b = cache_for(replicas[0]), cache_for(replicas[1])
    assert not (await a.get("node:x", missing)).found
    second = await b.get("node:x", missing)
    assert (second.found, second.status) == (False, "negative")
    assert calls == 1


async def test_a_lock_holder_that_never_finishes_does_not_block_readers_forever(replicas):
    backend = CountingBackend(delay=0)
    # Someone (a paused replica) holds the lock and will never write the entry.
    await replicas[0].cache_store.acquire("k", "zombie", 60_000)
    cache = ResponseCache(replicas[1].cache_store, policy=POLICY, rand=lambda: 1.0, lock_wait_s=0.3)
    result = await asyncio.wait_for(cache.get("k", backend.load, tags=["nodes"]), 5)
    assert result.value == {"nodes": 3} and backend.calls == 1


async def test_a_loading_replica_holds_the_key_by_a_short_lease_so_a_kill_frees_it_soon(
    replicas,
):
    # What a replica killed (kill -9) while loading leaves behind is its lock's remaining time:
    # one lease at most (renewed while it lives), not the 5 s lock TTL the other replica's
    # viewers would wait for.
    release = asyncio.Event()

    async def slow() -> dict[str, int]:
        await release.wait()
        return {"nodes": 1}

    store = replicas[0].cache_store
    a = cache_for(replicas[0], lock_lease_s=0.3)
    loading = asyncio.ensure_future(a.get("k", slow))
    try:
        for _ in range(4):  # across several renewals
            await asyncio.sleep(0.25)
            left_ms = await store.client.pttl(f"{store.prefix}:l:k")
            assert 0 < left_ms <= 300, left_ms
    finally:
        release.set()
        await loading


async def test_a_live_holder_renews_its_lock_while_a_load_outlasts_the_lease(replicas):
    backend = CountingBackend(delay=1.2)  # four leases of 0.3 s
    a, b = cache_for(replicas[0], lock_lease_s=0.3), cache_for(replicas[1], lock_lease_s=0.3)
    first = asyncio.ensure_future(a.get("k", backend.load))
    # a holds the lock once its load has begun (it loads only after taking it).
    await eventually(lambda: backend.calls == 1, timeout=5, what="a's load started")
    second = await asyncio.wait_for(b.get("k", backend.load), 5)
    await first
    # b waited for a's entry instead of loading itself once the first lease ran out.
    assert backend.calls == 1 and second.status == "hit", (backend.calls, second.status)


async def test_rate_limit_is_exact_across_replicas(replicas):
    limiters = [RateLimiter(r.bucket_store) for r in replicas]
    limit = Limit(capacity=25, rate=0.001)  # no refill during the test
    decisions = await asyncio.gather(
        *[limiters[i % 2].check("tenant:acme", limit) for i in range(60)]
    )
    assert sum(d.allowed for d in decisions) == 25
    assert all(d.exact for d in decisions)
    rejected = [d for d in decisions if not d.allowed]
    assert all(d.retry_after_s >= 1 and d.remaining == 0 for d in rejected)


async def test_buckets_are_per_key(replicas):
    limiter = RateLimiter(replicas[0].bucket_store)
    limit = Limit(capacity=1, rate=0.001)
    assert (await limiter.check("ip:10.0.0.1", limit)).allowed
    assert not (await limiter.check("ip:10.0.0.1", limit)).allowed
    assert (await limiter.check("ip:10.0.0.2", limit)).allowed


@pytest.mark.failure
async def test_redis_outage_degrades_then_recovers_by_itself(redis_factory):
    server = redis_factory()
    client = connect(server.url, timeout_s=0.3)
    health = RedisHealth(client)
    cache = ResponseCache(
        RedisCacheStore(client, health, "t"), policy=POLICY, rand=lambda: 1.0, local_size=10
    )
    health.on_recover(cache.flush_pending)
    limiter = RateLimiter(RedisBucketStore(client, health, "t"))
    backend = CountingBackend(delay=0)
    limit = Limit(capacity=100, rate=1.0)
    try:
        assert (await cache.get("k", backend.load, tags=["nodes"])).status == "miss"
        assert (await limiter.check("tenant:a", limit)).exact

        server.stop()
        during = await asyncio.wait_for(cache.get("k", backend.load, tags=["nodes"]), 5)
        assert during.value == {"nodes": 3}
        assert not health.up
        assert (await cache.get("k", backend.load, tags=["nodes"])).status == "bypass"
        decision = await asyncio.wait_for(limiter.check("tenant:a", limit), 5)
        assert decision.allowed and not decision.exact

        server.start()
        for _ in range(100):  # bounded polling: the probe is what brings it back
            if await health.probe():
                break
            await asyncio.sleep(0.1)
        assert health.up
        assert (
            await cache.get("k", backend.load, tags=["nodes"])
        ).status == "miss"  # Redis came back empty
        assert (await cache.get("k", backend.load, tags=["nodes"])).status == "hit"
        assert (await limiter.check("tenant:a", limit)).exact
    finally:
        await client.aclose()


@pytest.mark.failure
async def test_an_invalidation_made_while_redis_was_unreachable_is_applied_on_recovery(
    redis_factory,
):
    server = redis_factory()
    clients = [connect(server.url, timeout_s=0.3) for _ in range(2)]
    healths = [RedisHealth(c) for c in clients]
    a, b = (
        ResponseCache(RedisCacheStore(c, h, "t"), policy=POLICY, rand=lambda: 1.0)
        for c, h in zip(clients, healths, strict=True)
    )
    healths[0].on_recover(a.flush_pending)
    backend = CountingBackend(delay=0)
    try:
        await a.get("k", backend.load, tags=["nodes"])
        # Replica a loses Redis (as in a partition: Redis itself keeps the entry).
        healths[0].mark_down(ConnectionError("partition"))
        backend.value = {"nodes": 9}
        assert await a.invalidate(["nodes"]) is False
        stale = await b.get("k", backend.load, tags=["nodes"])
        assert stale.value == {"nodes": 3}  # b cannot know yet
        assert await healths[0].probe()  # a reaches Redis again and replays the bump
        fresh = await b.get("k", backend.load, tags=["nodes"])
        assert (fresh.status, fresh.value) == ("miss", {"nodes": 9})
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.failure
async def test_a_paused_redis_costs_one_short_timeout_then_requests_bypass_it(redis_factory):
    server = redis_factory()
    client = connect(server.url, timeout_s=0.3)
    health = RedisHealth(client)
    cache = ResponseCache(RedisCacheStore(client, health, "t"), policy=POLICY, rand=lambda: 1.0)
    limiter = RateLimiter(RedisBucketStore(client, health, "t"))
    backend = CountingBackend(delay=0)
    try:
        await cache.get("k", backend.load, tags=["nodes"])
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        first = await asyncio.wait_for(cache.get("k", backend.load, tags=["nodes"]), 5)
        assert first.status == "bypass" and not health.up
        # Now marked down: later calls do not wait on the socket at all.
        assert (await asyncio.wait_for(limiter.check("tenant:a", Limit(5, 1.0)), 1)).allowed
        server.resume()
        assert await wait_up(health)
        assert (await cache.get("k", backend.load, tags=["nodes"])).status in ("hit", "miss")
    finally:
        server.resume()
        await client.aclose()


async def wait_up(health: RedisHealth) -> bool:
    for _ in range(100):
        if await health.probe():
            return True
        await asyncio.sleep(0.1)
    return False
