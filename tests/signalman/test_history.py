"""The history contract, run against both backends (memory and a real redis-server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pkg.events import Event
from signalman.history import History, SourcePos
from signalman.history.memory import MemoryHistory
from signalman.history.redis import RedisHistory


@pytest.fixture(params=["memory", "redis", "redis-resp2"])
async def history(request: pytest.FixtureRequest) -> AsyncIterator[History]:
    if request.param == "memory":
        yield MemoryHistory(max_len=100)
        return
    server: Any = request.getfixturevalue("redis_server")
    # redis-py speaks RESP3 by default; a client configured for RESP2 gets other reply shapes.
    client = None
    if request.param == "redis-resp2":
        client = aioredis.Redis.from_url(server.url, protocol=2)
    store = RedisHistory(server.url, prefix=f"t{uuid.uuid4().hex[:8]}", max_len=100, client=client)
    try:
        yield store
    finally:
        await store.close()


def ev(n: int, tenant: str = "acme", when: float = 1_000.0) -> Event:
    return Event("stream.started", tenant, {"n": n}, time=when)


async def test_append_assigns_consecutive_offsets_per_tenant(history: History) -> None:
    r1 = await history.append(
        "acme", [("streams", ev(1)), ("streams", ev(2))], SourcePos("t", 0, 0), 1
    )
    r2 = await history.append("acme", [("routing", ev(3))], SourcePos("t", 1, 0), 1)
    other = await history.append("globex", [("streams", ev(9, "globex"))], SourcePos("t", 2, 0), 1)
    assert (r1.status, r1.offsets) == ("appended", (1, 2))
    assert r2.offsets == (3,) and r2.epoch == r1.epoch
    assert other.offsets == (1,)
    entries = await history.read_after("acme", 0, 10)
    assert [(e.offset, e.channel, e.event.data["n"]) for e in entries] == [
        (1, "streams", 1), (2, "streams", 2), (3, "routing", 3),
    ]  # fmt: skip


async def test_append_is_idempotent_per_kafka_offset(history: History) -> None:
    src = SourcePos("t", 0, 41)
    first = await history.append("acme", [("streams", ev(1))], src, 1)
    again = await history.append("acme", [("streams", ev(1))], src, 1)
    older = await history.append("acme", [("streams", ev(0))], SourcePos("t", 0, 40), 1)
    assert first.status == "appended"
    assert again.status == "duplicate" and older.status == "duplicate"
    assert len(await history.read_after("acme", 0, 10)) == 1
    assert await history.watermark("t", 0) == 41


async def test_stale_fence_is_rejected(history: History) -> None:
    await history.append("acme", [("streams", ev(1))], SourcePos("t", 0, 0), 1)
    assert await history.claim("t", 0, 2) == 2  # a new owner took the partition
    stale = await history.append("acme", [("streams", ev(2))], SourcePos("t", 0, 1), 1)
    assert stale.status == "fenced" and stale.current_fence == 2
    fresh = await history.append("acme", [("streams", ev(2))], SourcePos("t", 0, 1), 2)
    assert fresh.status == "appended"
    assert await history.claim("t", 0, 1) == 2  # claims never lower the fence


async def test_info_reports_epoch_first_and_head(history: History) -> None:
    assert (await history.info("acme")).head_offset == 0
    for i in range(5):
        await history.append("acme", [("streams", ev(i))], SourcePos("t", 0, i), 1)
    info = await history.info("acme")
    assert info.epoch and info.first_offset == 1 and info.head_offset == 5


async def test_info_many_answers_as_info_does_for_each_tenant(history: History) -> None:
    for i in range(3):
        await history.append("acme", [("streams", ev(i))], SourcePos("t", 0, i), 1)
    await history.append("beta", [("streams", ev(9, "beta"))], SourcePos("t", 0, 3), 1)
    await history.trim("acme", max_len=2, min_time=0)
    tenants = ["acme", "nobody", "beta"]
    assert await history.info_many(tenants) == [await history.info(t) for t in tenants]
    assert await history.info_many([]) == []


async def test_trim_by_length_and_age_keeps_a_suffix(history: History) -> None:
    for i in range(10):
        await history.append(
            "acme", [("streams", ev(i, when=1_000.0 + i))], SourcePos("t", 0, i), 1
        )
    await history.trim("acme", max_len=8, min_time=0)
    assert (await history.info("acme")).first_offset == 3
    await history.trim("acme", max_len=100, min_time=1_005.0)
    info = await history.info("acme")
    assert info.first_offset == 6 and info.head_offset == 10
    assert "acme" in await history.tenants()


async def test_wait_many_returns_new_entries(history: History) -> None:
    assert await history.wait_many({"acme": 0}, 0.05) == {}

    async def later() -> None:
        await asyncio.sleep(0.05)
        await history.append("acme", [("streams", ev(7))], SourcePos("t", 0, 0), 1)

    task = asyncio.create_task(later())
    got = await history.wait_many({"acme": 0}, 5.0)
    await task
    assert [e.event.data["n"] for e in got["acme"]] == [7]


async def test_one_wait_serves_every_tenant_from_its_own_position(history: History) -> None:
    for i, tenant in enumerate(["acme", "globex", "acme", "initech"]):
        await history.append(tenant, [("streams", ev(i, tenant))], SourcePos("t", 0, i), 1)
    got = await history.wait_many({"acme": 1, "globex": 0, "initech": 1, "umbrella": 0}, 5.0)
    # acme after its first entry, globex from the start, nothing new for initech or umbrella.
    assert {t: [e.event.data["n"] for e in entries] for t, entries in got.items()} == {
        "acme": [2], "globex": [1],
    }  # fmt: skip

    async def later() -> None:
        await asyncio.sleep(0.05)
        await history.append("umbrella", [("streams", ev(9, "umbrella"))], SourcePos("t", 1, 0), 1)

    task = asyncio.create_task(later())
    got = await history.wait_many({"acme": 2, "umbrella": 0}, 5.0)
    await task
    assert [e.event.data["n"] for e in got["umbrella"]] == [9] and "acme" not in got
