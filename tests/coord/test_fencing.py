"""Fenced writes: Redis rejects any write whose fence is below the newest one it has seen."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pkg.coord import (
    FenceCounter,
    FencedHash,
    FencedWrite,
    FencedWriteRejected,
    PreparedWrite,
    WriteResult,
)
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


async def test_write_many_applies_each_write_and_reports_each_rejection(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    await store.write(f"{prefix}:b", f"{prefix}:ob", 9, {"v": "old"})
    await redis.script_flush()  # as after a Redis restart: the batch must load the script
    results = await store.write_many(
        [
            FencedWrite(f"{prefix}:a", f"{prefix}:oa", 1, {"v": "a1"}),
            FencedWrite(f"{prefix}:b", f"{prefix}:ob", 8, {"v": "stale"}),
            FencedWrite(f"{prefix}:c", f"{prefix}:oc", 3, {"v": "c3"}),
        ]
    )
    assert isinstance(results[0], WriteResult) and isinstance(results[2], WriteResult)
    assert isinstance(results[1], FencedWriteRejected) and results[1].newer_fence == 9
    assert await redis.hget(f"{prefix}:a", "v") == "a1"
    assert await redis.hget(f"{prefix}:b", "v") == "old"


async def test_announce_can_carry_the_written_fields_without_sending_them_twice(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    stream = f"{prefix}:log"
    announce = Announce(stream=stream, maxlen=10, fields={"op": "put"}, include_written=True)
    await store.write(f"{prefix}:n", f"{prefix}:o", 2, {"rec": "{...}"}, announce=announce)
    (_, fields), *_ = await redis.xrange(stream)
    assert fields == {"n": "1", "fence": "2", "op": "put", "rec": "{...}"}


async def test_a_write_extends_the_writers_owner_record_only_if_it_is_still_theirs(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    owner = f"{prefix}:owner"
    await redis.set(owner, "a|x:1|3", px=1_000)
    await store.write(f"{prefix}:n", owner, 3, {"v": "1"}, touch=("a|x:1|3", 60_000))
    assert await redis.pttl(owner) > 10_000
    await redis.set(owner, "b|x:2|4", px=1_000)  # b took over
    with pytest.raises(FencedWriteRejected):
        await store.write(f"{prefix}:n", owner, 3, {"v": "2"}, touch=("a|x:1|3", 60_000))
    assert await redis.pttl(owner) <= 1_000


@pytest.mark.parametrize("touch", [None, ("a|addr|3", 15_000)])
@pytest.mark.parametrize("with_announce", [True, False])
def test_a_prepared_write_lays_out_exactly_the_args_of_a_fenced_write(
    touch: tuple[str, int] | None, with_announce: bool
) -> None:
    announce = (
        Announce("s", maxlen=100, fields={"origin": "a", "op": "put"}, include_written=True)
        if with_announce
        else None
    )
    fields = {"rec": "{}", "ver": "4"}
    write = FencedWrite("k", "o", 7, fields, ttl_ms=5000, announce=announce, touch=touch)
    keys, args = write.keys_and_args()
    prepared = PreparedWrite("k", "o", ttl_ms=5000, announce=announce)
    assert list(prepared.keys) == keys
    assert prepared.args(7, ["rec", "{}", "ver", "4"], touch) == [str(len(args)), *args]


async def test_write_prepared_checks_fences_like_write_many(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = FencedHash(redis)
    await redis.set(f"{prefix}o2", "b|addr|9")
    ok = PreparedWrite(f"{prefix}h1", f"{prefix}o1", announce=Announce(f"{prefix}s", 100, {}))
    stale = PreparedWrite(f"{prefix}h2", f"{prefix}o2", announce=Announce(f"{prefix}s", 100, {}))
    results = await store.write_prepared(
        [*ok.keys, *stale.keys],
        [*ok.args(5, ["x", "1"], None), *stale.args(5, ["x", "2"], None)],
    )
    assert isinstance(results[0], WriteResult) and results[0].entry_id
    assert isinstance(results[1], FencedWriteRejected) and results[1].newer_fence == 9
    assert await redis.hget(f"{prefix}h1", "x") == "1"
    assert await redis.exists(f"{prefix}h2") == 0
