"""Fenced ownership records: acquired with strictly higher fences, refreshed, match-deleted."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from pkg.coord import OwnerRecord, Ownership, RefreshOutcome

pytestmark = pytest.mark.integration


def test_record_round_trips_and_rejects_garbage() -> None:
    record = OwnerRecord("replica-a", "127.0.0.1:5000", 42)
    assert record.encode() == "replica-a|127.0.0.1:5000|42"
    assert OwnerRecord.decode(record.encode()) == record
    with pytest.raises(ValueError):
        OwnerRecord.decode("nonsense")


async def test_each_acquire_takes_a_strictly_higher_fence(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    a = await owners.acquire("n1", "a", "127.0.0.1:1")
    b = await owners.acquire("n1", "b", "127.0.0.1:2")
    assert a.ok and b.ok and a.record and b.record
    assert b.record.fence > a.record.fence
    assert await owners.get("n1") == b.record


async def test_refresh_of_a_superseded_owner_says_so_and_does_not_touch_the_record(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    old = (await owners.acquire("n1", "a", "x:1")).record
    new = (await owners.acquire("n1", "b", "x:2")).record
    assert old and new
    assert await owners.refresh("n1", old) is RefreshOutcome.SUPERSEDED
    assert await owners.get("n1") == new
    assert await owners.refresh("n1", new) is RefreshOutcome.EXTENDED


async def test_refresh_extends_the_ttl(redis: aioredis.Redis, prefix: str) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    rec = (await owners.acquire("n1", "a", "x:1")).record
    assert rec
    await redis.pexpire(owners.key("n1"), 500)
    assert await owners.refresh("n1", rec) is RefreshOutcome.EXTENDED
    assert await redis.pttl(owners.key("n1")) > 5_000


async def test_lapsed_record_is_restored_only_if_nobody_took_a_newer_fence(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    rec = (await owners.acquire("n1", "a", "x:1")).record
    assert rec
    await redis.delete(owners.key("n1"))  # as if the TTL ran out while we were slow
    assert await owners.refresh("n1", rec) is RefreshOutcome.RESTORED
    assert await owners.get("n1") == rec

    other = (await owners.acquire("n1", "b", "x:2")).record
    assert other
    assert await owners.release("n1", other)  # b held a newer fence, then let go
    assert await owners.refresh("n1", rec) is RefreshOutcome.SUPERSEDED
    assert await owners.get("n1") is None, "a zombie never resurrects its record"


async def test_record_expires_after_its_ttl(redis: aioredis.Redis, prefix: str) -> None:
    owners = Ownership(redis, prefix, ttl_ms=150)
    await owners.acquire("n1", "a", "x:1")
    for _ in range(100):
        if await owners.get("n1") is None:
            break
        await asyncio.sleep(0.05)
    assert await owners.get("n1") is None


async def test_release_and_evict_delete_only_the_matching_record(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    old = (await owners.acquire("n1", "a", "x:1")).record
    new = (await owners.acquire("n1", "b", "x:2")).record
    assert old and new
    assert not await owners.release("n1", old)
    assert not await owners.evict("n1", old), "evicting a record we no longer see is a no-op"
    assert await owners.get("n1") == new
    assert await owners.evict("n1", new)
    assert await owners.get("n1") is None


async def test_fences_keep_growing_after_redis_loses_its_data(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    for _ in range(5):
        rec = (await owners.acquire("n1", "a", "x:1")).record
    assert rec and rec.fence == 5
    # Redis restarted without persistence: every key of ours is gone.
    await redis.delete(owners.key("n1"), owners.counter_key, owners.high_water_key("n1"))
    assert await owners.refresh("n1", rec) is RefreshOutcome.RESTORED
    nxt = (await owners.acquire("n2", "b", "x:2")).record
    assert nxt and nxt.fence > rec.fence, "the counter was raised past the surviving fence"


async def test_concurrent_acquires_get_distinct_fences_and_the_highest_wins(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    results = await asyncio.gather(*(owners.acquire("n1", f"r{i}", "x:1") for i in range(20)))
    fences = [r.record.fence for r in results if r.record and r.ok]
    assert len(set(fences)) == len(fences)
    final = await owners.get("n1")
    assert final and final.fence == max(fences)


async def test_acquire_goes_above_a_fence_the_caller_still_knows(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    # Redis lost everything, but a replica still holds the node's record with fence 57.
    acquired = await owners.acquire("n1", "a", "x:1", at_least=57)
    assert acquired.ok and acquired.record and acquired.record.fence == 58
    nxt = await owners.acquire("n2", "b", "x:2")
    assert nxt.record and nxt.record.fence == 59


async def test_acquire_says_which_live_record_it_replaced(
    redis: aioredis.Redis, prefix: str
) -> None:
    owners = Ownership(redis, prefix, ttl_ms=10_000)
    first = await owners.acquire("n1", "a", "x:1")
    assert first.ok and first.replaced is None
    second = await owners.acquire("n1", "b", "x:2")
    assert second.ok and second.replaced == first.record
    assert second.record is not None
    await owners.release("n1", second.record)
    third = await owners.acquire("n1", "a", "x:1")
    assert third.ok and third.replaced is None, "a released record replaces nothing"
