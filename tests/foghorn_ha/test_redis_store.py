"""The Redis store: write-through, replayable sync between replicas, fencing, gaps, outages."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from api_balancing.store import redis_codec
from api_balancing.store.base import StaleWriteError
from api_balancing.store.redis_store import MAX_BATCH
from tests.foghorn_ha.conftest import StoreFactory, eventually, make_record

pytestmark = pytest.mark.integration


async def test_change_on_a_is_visible_in_b_memory(store_factory: StoreFactory) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    seen: list[tuple[str, Any]] = []
    b.add_listener(lambda node_id, rec: seen.append((node_id, rec)))
    stored = await a.put(make_record("n1", cpu=42.0, owner="a", fence=1))
    await eventually(lambda: b.get("n1") is not None)
    got = b.get("n1")
    assert got == stored and got.report and got.report.cpu_percent == 42.0
    assert seen and seen[-1][0] == "n1", "B's listeners (routing index) were told"
    assert a.healthy() and b.healthy()


async def test_versions_grow_and_every_replica_converges(store_factory: StoreFactory) -> None:
    stores = [await store_factory(name) for name in ("a", "b", "c")]
    for i, store in enumerate(stores):
        for j in range(5):
            await store.put(make_record(f"n{i}", cpu=float(j), owner=store.settings.replica_id))

    def views() -> list[dict[str, Any]]:
        return [
            {
                r.node_id: (r.version, r.report.cpu_percent if r.report else None)
                for r in s.snapshot()
            }
            for s in stores
        ]

    expected = {f"n{i}": (5, 4.0) for i in range(3)}
    await eventually(lambda: all(v == expected for v in views()))


async def test_lower_fence_is_rejected_by_redis_even_without_local_knowledge(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    await b.put(make_record("n1", owner="b", fence=7))
    # A writes before B's change reached it: only Redis can stop it.
    with pytest.raises(StaleWriteError):
        await a.put(make_record("n1", owner="a", fence=6))
    await eventually(lambda: a.get("n1") is not None and a.get("n1").owner == "b")  # type: ignore[union-attr]


async def test_stale_change_never_rolls_back_fresher_state(store_factory: StoreFactory) -> None:
    a = await store_factory("a")
    fresh = await a.put(make_record("n1", owner="x", fence=5, cpu=1.0))
    older = dataclasses.replace(make_record("n1", owner="y", fence=4, cpu=99.0), version=100)
    assert not a.apply_remote(older), "a lower fence loses whatever its version"
    assert a.get("n1") == fresh


async def test_restarted_replica_rehydrates_from_redis(store_factory: StoreFactory) -> None:
    a = await store_factory("a")
    for i in range(20):
        await a.put(make_record(f"n{i}", owner="a"))
    b = await store_factory("b")  # a fresh process: everything comes from the snapshot
    assert len(b.snapshot()) == 20
    assert b.healthy()


async def test_trimmed_changelog_forces_a_gap_and_the_replica_reconverges(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a", changelog_maxlen=5, exact_trim=True)
    b = await store_factory("b", changelog_maxlen=5, exact_trim=True, read_block_ms=100)
    loop = b.sync_loop
    before = loop.rehydrations
    await b.pause_sync()  # B is a slow reader while A writes far more than the log keeps
    for i in range(30):
        await a.put(make_record(f"n{i}", owner="a"))
    b.resume_sync()
    await eventually(lambda: loop.rehydrations > before)
    assert "trimmed" in loop.last_gap
    await eventually(lambda: len(b.snapshot()) == 30)


async def test_delete_reaches_other_replicas(store_factory: StoreFactory) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    await a.put(make_record("n1", owner="a"))
    await eventually(lambda: b.get("n1") is not None)
    await a.delete("n1")
    await eventually(lambda: b.get("n1") is None)
    assert a.get("n1") is None


async def test_redis_restart_degrades_then_reconverges_and_republishes(
    redis_factory: Any, store_factory: StoreFactory
) -> None:
    server = redis_factory()
    a = await store_factory("a", url=server.url)
    b = await store_factory("b", url=server.url)
    a.set_ownership_view(lambda node_id: 1)
    await a.put(make_record("n1", owner="a", fence=1, cpu=1.0))
    await eventually(lambda: b.get("n1") is not None)
    server.stop()
    # Writes while Redis is down are accepted locally; reads keep answering.
    await eventually(lambda: not a.healthy())
    await a.put(make_record("n1", owner="a", fence=1, cpu=2.0))
    assert a.get("n1").report.cpu_percent == 2.0  # type: ignore[union-attr]
    assert b.get("n1") is not None, "B keeps routing from memory"
    assert "redis" in a.health.status.reason
    server.start()
    await eventually(lambda: a.healthy() and b.healthy())
    await eventually(
        lambda: b.get("n1") is not None and b.get("n1").report.cpu_percent == 2.0  # type: ignore[union-attr]
    )
    assert a.counters.republished >= 1


async def test_concurrent_writes_share_script_calls_and_every_one_reaches_redis_in_order(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    calls: list[int] = []
    put_batch = a._fenced.put_batch

    async def counting(batch: Any) -> Any:
        calls.append(len(batch))
        return await put_batch(batch)

    a._fenced.put_batch = counting  # type: ignore[method-assign]

    async def node(i: int) -> None:
        for k in range(5):  # one node's writes follow each other, like its reports
            await a.put(make_record(f"n{i}", owner="a", cpu=float(k)))

    await asyncio.gather(*(node(i) for i in range(50)))
    assert sum(calls) == 250, "every write went to Redis"
    assert len(calls) < 250 / 5, f"writes of one loop turn share a script call: {calls}"
    assert max(calls) <= MAX_BATCH
    for i in range(50):
        raw = await a.redis.hget(a.keys.node(f"n{i}"), "rec")
        assert raw is not None and redis_codec.decode(raw).report.cpu_percent == 4.0  # type: ignore[union-attr]
    await eventually(
        lambda: all(
            (r := b.get(f"n{i}")) is not None and r.version == 5 and r.report.cpu_percent == 4.0  # type: ignore[union-attr]
            for i in range(50)
        )
    )


async def test_a_write_refused_by_redis_fails_only_its_own_writer(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    other = await store_factory("b")
    await a.pause_sync()  # A does not learn of b's write: only Redis can refuse A's
    await other.put(make_record("taken", owner="b", fence=9))
    results = await asyncio.gather(
        a.put(make_record("free", owner="a", fence=1)),
        a.put(make_record("taken", owner="a", fence=3)),  # below b's fence, in the same batch
        a.put(make_record("free2", owner="a", fence=1)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StaleWriteError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert await a.redis.exists(a.keys.node("free"), a.keys.node("free2")) == 2
    assert redis_codec.decode(await a.redis.hget(a.keys.node("taken"), "rec")).owner == "b"


async def test_a_replica_never_reads_back_its_own_writes(store_factory: StoreFactory) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    for i in range(30):
        await a.stage(make_record(f"n{i}", owner="a", fence=1))
    await eventually(lambda: len(b.snapshot()) == 30)
    assert a.log_key not in a.sync_loop.reader.positions, "a reads only the others' streams"
    assert b.sync_loop.reader.positions[a.log_key].index >= 30
    assert a.counters.remote_applied == 0 and a.counters.remote_stale == 0
    assert await a.redis.xlen(a.log_key) >= 30 and await a.redis.xlen(b.log_key) == 0


async def test_a_replica_started_later_is_read_from_its_first_write(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    late = await store_factory("late")  # registers its stream, then writes at once
    await late.put(make_record("n1", owner="late", fence=1))
    await eventually(lambda: a.get("n1") is not None)
    assert late.log_key in a.sync_loop.reader.positions
    assert a.sync_loop.rehydrations == 1, "discovered without a gap or a rehydration"


async def test_replicas_silent_past_the_retention_leave_the_registry(
    store_factory: StoreFactory,
) -> None:
    first = await store_factory("first", record_ttl_s=30.0)
    keys = first.keys
    await first.redis.zadd(keys.logs, {"ghost": 1.0})  # last heartbeat long ago
    await first.redis.xadd(keys.log("ghost"), {"n": "1"})
    b = await store_factory("b", record_ttl_s=30.0)
    assert keys.log("ghost") not in b.sync_loop.reader.positions
    assert await b.redis.zscore(keys.logs, "ghost") is None
    assert await b.redis.zscore(keys.logs, "first") is not None
    await b.put(make_record("n1", owner="b", fence=1))
    await b.sync_loop._heartbeat()  # every few seconds: the stream lives while b does
    assert 0 < await b.redis.pttl(b.log_key) <= 30_000
