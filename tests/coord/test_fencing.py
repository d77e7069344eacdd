"""Fenced writes: Redis rejects any write whose fence is below the newest one it has seen."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pkg.coord import BatchOutcome, FenceCounter, FencedHash, FencedWriteRejected, PutBatch
from pkg.coord.changelog import Changelog
from pkg.coord.fencing import Announce

pytestmark = pytest.mark.integration


async def test_fence_counter_only_grows_and_can_be_raised(
    redis: aioredis.Redis, prefix: str
) -> None:
    counter = FenceCounter(redis, f"{prefix}:fence")
    assert await counter.current() == 0
    assert [await counter.next() for _ in range(3)] == [1, 2, 3]
    await counter.ensure_at_least(2)
    assert await counter.current() == 3, "ensure_at_least never lowers"
    await counter.ensure_at_least(40)
    assert await counter.next() == 41


async def test_write_stores_fields_and_its_fence(redis: aioredis.Redis, prefix: str) -> None:
    store = FencedHash(redis)
    await store.write(f"{prefix}:n1", f"{prefix}:owner:n1", 7, {"cpu": "12.5"})
    assert await redis.hgetall(f"{prefix}:n1") == {"_fence": "7", "cpu": "12.5"}


async def test_lower_fence_than_stored_state_is_rejected_and_changes_nothing(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    key, owner = f"{prefix}:n1", f"{prefix}:owner:n1"
    await store.write(key, owner, 8, {"cpu": "1"})
    with pytest.raises(FencedWriteRejected) as err:
        await store.write(key, owner, 7, {"cpu": "99"})
    assert err.value.reason == "state"
    assert err.value.newer_fence == 8
    assert await redis.hget(key, "cpu") == "1"


async def test_lower_fence_than_owner_record_is_rejected(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    key, owner = f"{prefix}:n1", f"{prefix}:owner:n1"
    await store.write(key, owner, 3, {"cpu": "1"})
    await redis.set(owner, "replica-b|127.0.0.1:9|4")  # a newer owner took over, no write yet
    with pytest.raises(FencedWriteRejected) as err:
        await store.write(key, owner, 3, {"cpu": "2"})
    assert (err.value.reason, err.value.newer_fence) == ("owner", 4)
    await store.write(key, owner, 4, {"cpu": "3"})
    assert await redis.hget(key, "cpu") == "3"


async def test_accepted_write_is_announced_in_the_same_step_and_rejected_one_is_not(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    key, owner, stream = f"{prefix}:n1", f"{prefix}:owner:n1", f"{prefix}:log"
    announce = Announce(stream=stream, maxlen=3, fields={"op": "put", "id": "n1"}, exact_trim=True)
    result = await store.write(key, owner, 5, {"cpu": "1"}, announce=announce)
    with pytest.raises(FencedWriteRejected):
        await store.write(key, owner, 4, {"cpu": "2"}, announce=announce)
    entries = await redis.xrange(stream)
    assert [e[0] for e in entries] == [result.entry_id]
    assert entries[0][1] == {"n": "1", "fence": "5", "op": "put", "id": "n1"}
    for _ in range(5):
        await store.write(key, owner, 5, {"cpu": "1"}, announce=announce)
    assert await redis.xlen(stream) == 3, "the changelog stays within its bound"


async def test_write_with_ttl_expires_the_state(redis: aioredis.Redis, prefix: str) -> None:
    store = FencedHash(redis)
    await store.write(f"{prefix}:n1", f"{prefix}:o", 1, {"a": "b"}, ttl_ms=60_000)
    assert 0 < await redis.pttl(f"{prefix}:n1") <= 60_000


async def test_delete_is_match_checked_and_guarded(redis: aioredis.Redis, prefix: str) -> None:
    store = FencedHash(redis)
    key, owner, lease = f"{prefix}:n1", f"{prefix}:owner:n1", f"{prefix}:leader"
    await store.write(key, owner, 5, {"cpu": "1"})
    with pytest.raises(FencedWriteRejected) as err:
        await store.delete(key, owner, expect=("_fence", "4"))
    assert err.value.reason == "changed", "someone wrote since the deleter looked"
    await redis.set(lease, "other|9")
    with pytest.raises(FencedWriteRejected) as err:
        await store.delete(key, owner, expect=("_fence", "5"), guard=(lease, "me|8"))
    assert err.value.reason == "guard", "not the lease holder any more"
    with pytest.raises(FencedWriteRejected):
        await store.delete(key, owner, fence=4)
    assert await redis.exists(key) == 1
    stream = f"{prefix}:log"
    result = await store.delete(
        key,
        owner,
        expect=("_fence", "5"),
        guard=(lease, "other|9"),
        announce=Announce(stream=stream, maxlen=10, fields={"op": "del"}),
    )
    assert await redis.exists(key) == 0
    assert (await redis.xrange(stream))[0] == (
        result.entry_id,
        {"n": "1", "fence": "5", "op": "del"},
    )


async def test_delete_of_a_missing_key_is_still_announced(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    stream = f"{prefix}:log"
    await store.delete(
        f"{prefix}:gone", f"{prefix}:o", expect=("v", "1"),
        announce=Announce(stream=stream, maxlen=10, fields={"op": "del"}),
    )  # fmt: skip
    assert await redis.xlen(stream) == 1


def _batch(prefix: str, maxlen: int = 100, touch_ttl_ms: int = 0) -> PutBatch:
    return PutBatch(
        f"{prefix}:log",
        origin="a",
        maxlen=maxlen,
        exact_trim=True,
        ttl_ms=60_000,
        touch_ttl_ms=touch_ttl_ms,
        state_field="rec",
    )


async def test_a_put_batch_applies_each_put_and_reports_each_rejection(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    await store.write(f"{prefix}:b", f"{prefix}:ob", 9, {"rec": "old"})
    await redis.set(f"{prefix}:oc", "b|addr|7")
    await redis.script_flush()  # as after a Redis restart: the batch must load the script
    batch = _batch(prefix)
    batch.add(f"{prefix}:a", f"{prefix}:oa", 1, "a", "a1", 1)
    batch.add(f"{prefix}:b", f"{prefix}:ob", 8, "b", "stale", 2)
    batch.add(f"{prefix}:c", f"{prefix}:oc", 6, "c", "stale", 3)
    batch.add(f"{prefix}:d", f"{prefix}:od", 2, "d", "d1", 4)
    assert len(batch) == 4
    outcome = await store.put_batch(batch)
    rejected = outcome.rejected
    assert sorted(rejected) == [1, 2] and not outcome.untouched
    assert (rejected[1].reason, rejected[1].newer_fence) == ("state", 9)
    assert (rejected[2].reason, rejected[2].newer_fence) == ("owner", 7)
    assert await redis.hgetall(f"{prefix}:a") == {"_fence": "1", "rec": "a1", "ver": "1"}
    assert await redis.hget(f"{prefix}:b", "rec") == "old"
    assert await redis.exists(f"{prefix}:c") == 0
    assert 0 < await redis.pttl(f"{prefix}:d") <= 60_000


async def test_each_accepted_put_is_announced_with_its_origin_first(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    await redis.set(f"{prefix}:ob", "b|addr|7")
    batch = _batch(prefix)
    batch.add(f"{prefix}:a", f"{prefix}:oa", 1, "a", "a1", 1)
    batch.add(f"{prefix}:b", f"{prefix}:ob", 6, "b", "stale", 2)
    await store.put_batch(batch)
    plain = aioredis.Redis(connection_pool=redis.connection_pool)  # the reply as Redis sends it
    plain.set_response_callback("XRANGE", lambda response, **_: response)
    raw = await plain.xrange(f"{prefix}:log")
    assert len(raw) == 1, "the rejected put is not announced"
    (_, flat), *_ = raw
    assert flat[:4] == ["n", "1", "origin", "a"], "readers skip their own entries by position"
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == {
        "n": "1", "origin": "a", "op": "put", "id": "a", "fence": "1", "rec": "a1", "ver": "1",
    }  # fmt: skip
    reader = Changelog(redis, f"{prefix}:log").reader()
    (entry,) = await reader.read(block_ms=10)
    assert entry.origin == "a" and entry.fields["rec"] == "a1"


async def test_a_put_extends_the_writers_owner_record_only_if_it_is_still_theirs(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    owner = f"{prefix}:owner"
    await redis.set(owner, "a|x:1|3", px=1_000)

    async def put(fence: int, touch: str) -> BatchOutcome:
        batch = _batch(prefix, touch_ttl_ms=60_000)
        batch.add(f"{prefix}:n", owner, fence, "n", f"s{fence}", fence, touch=touch)
        return await store.put_batch(batch)

    assert await put(3, "a|x:1|3") == BatchOutcome({})
    assert await redis.pttl(owner) > 10_000
    await redis.set(owner, "a|x:1|4", px=1_000)  # a took the node again, with a newer fence
    outcome = await put(4, "a|x:1|3")
    assert not outcome.rejected and outcome.untouched == {0}, "written, but told: not touched"
    assert await redis.pttl(owner) <= 1_000, "only the exact record the writer holds"
    await redis.delete(owner)  # lapsed: the write still lands, the writer is told
    assert (await put(5, "a|x:1|4")).untouched == {0}
    assert await redis.exists(owner) == 0, "a touch never creates a record"
    assert await put(6, "") == BatchOutcome({}), "no touch asked, none reported"


async def test_an_empty_put_batch_sends_nothing(redis: aioredis.Redis, prefix: str) -> None:
    assert await FencedHash(redis).put_batch(_batch(prefix)) == BatchOutcome({})
    assert await redis.exists(f"{prefix}:log") == 0
