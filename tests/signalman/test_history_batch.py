"""Batched appends (``History.append_many``), the consumer's hot path, on both backends.

A fetched batch is appended in one call (one Redis round trip), but every record in it is still
checked on its own, in order: its partition's fence, then its partition's watermark.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pkg.events import Event
from signalman.history import History, SourcePos
from signalman.history.memory import MemoryHistory
from signalman.history.redis import RedisHistory


@pytest.fixture(params=["memory", "redis"])
async def history(request: pytest.FixtureRequest) -> AsyncIterator[History]:
    if request.param == "memory":
        yield MemoryHistory(max_len=10_000)
        return
    server: Any = request.getfixturevalue("redis_server")
    store = RedisHistory(server.url, prefix=f"b{uuid.uuid4().hex[:8]}", max_len=10_000)
    try:
        yield store
    finally:
        await store.close()


def ev(n: int, tenant: str = "acme", **data: Any) -> Event:
    return Event("stream.started", tenant, {"n": n, **data}, time=1_763_793_123.123456 + n)


async def test_one_call_appends_several_tenants_and_partitions_in_order(history: History) -> None:
    results = await history.append_many(
        [
            ("acme", [("streams", ev(1)), ("streams", ev(2))], SourcePos("t", 0, 10)),
            ("globex", [("streams", ev(3, "globex"))], SourcePos("t", 1, 5)),
            ("acme", [("routing", ev(4))], SourcePos("t", 0, 11)),
        ],
        1,
    )
    assert [(r.status, r.offsets) for r in results] == [
        ("appended", (1, 2)), ("appended", (1,)), ("appended", (3,)),
    ]  # fmt: skip
    assert results[0].epoch == results[2].epoch != ""
    acme = await history.read_after("acme", 0, 10)
    assert [(e.offset, e.channel, e.event.data["n"]) for e in acme] == [
        (1, "streams", 1), (2, "streams", 2), (3, "routing", 4),
    ]  # fmt: skip
    assert await history.watermark("t", 0) == 11 and await history.watermark("t", 1) == 5


async def test_records_at_or_below_the_watermark_are_duplicates_even_within_one_call(
    history: History,
) -> None:
    await history.append("acme", [("streams", ev(0))], SourcePos("t", 0, 7), 1)
    results = await history.append_many(
        [
            ("acme", [("streams", ev(1))], SourcePos("t", 0, 6)),  # replayed: below
            ("acme", [("streams", ev(2))], SourcePos("t", 0, 8)),
            ("acme", [("streams", ev(3))], SourcePos("t", 0, 8)),  # same offset again
            ("acme", [("streams", ev(4))], SourcePos("t", 0, 9)),
        ],
        1,
    )
    assert [r.status for r in results] == ["duplicate", "appended", "duplicate", "appended"]
    entries = await history.read_after("acme", 0, 10)
    assert [e.event.data["n"] for e in entries] == [0, 2, 4]


async def test_a_stale_fence_rejects_only_the_records_of_the_partition_it_lost(
    history: History,
) -> None:
    assert await history.claim("t", 0, 2) == 2  # partition 0 has a newer owner
    results = await history.append_many(
        [
            ("acme", [("streams", ev(1))], SourcePos("t", 0, 0)),
            ("acme", [("streams", ev(2))], SourcePos("t", 1, 0)),
            ("acme", [("streams", ev(3))], SourcePos("t", 0, 1)),
        ],
        1,
    )
    assert [(r.status, r.current_fence) for r in results] == [
        ("fenced", 2), ("appended", 1), ("fenced", 2),
    ]  # fmt: skip
    assert [e.event.data["n"] for e in await history.read_after("acme", 0, 10)] == [2]
    assert await history.watermark("t", 0) == -1


async def test_a_full_fetch_of_records_is_appended_in_one_call(history: History) -> None:
    records = [
        (f"t{i % 8}", [("streams", ev(i, f"t{i % 8}"))], SourcePos("t", i % 4, i // 4))
        for i in range(1_000)
    ]
    results = await history.append_many(records, 1)
    assert all(r.status == "appended" for r in results)
    entries = await history.read_after("t3", 0, 1_000)
    assert [e.event.data["n"] for e in entries] == list(range(3, 1_000, 8))
    assert [e.offset for e in entries] == list(range(1, 126))


async def test_event_fields_round_trip_exactly(history: History) -> None:
    awkward = {
        "quote": 'say "hi"\\n',
        "unicode": "café ☃ 😀",
        "nested": {"list": [1, 2.5, None, True], "empty": {}},
        "big": 2**53 + 1,
    }
    event = Event("node.registered", "acme", awkward, id="id-1", time=1_763_793_123.987654321,
                  source="foghorn é")  # fmt: skip
    (result,) = await history.append_many([("acme", [("nodes", event)], SourcePos("t", 0, 0))], 1)
    assert result.status == "appended"
    (entry,) = await history.read_after("acme", 0, 10)
    assert entry.event == event
    assert entry.epoch == result.epoch


async def test_one_call_carries_each_partitions_own_fence(history: History) -> None:
    assert await history.claim("t", 0, 3) == 3
    assert await history.claim("t", 1, 5) == 5
    results = await history.append_many(
        [
            ("acme", [("streams", ev(1))], SourcePos("t", 0, 0)),
            ("acme", [("streams", ev(2))], SourcePos("t", 1, 0)),
            ("acme", [("streams", ev(3))], SourcePos("t", 1, 1)),
        ],
        {("t", 0): 3, ("t", 1): 4},  # partition 1 has a newer owner than us
    )
    assert [(r.status, r.current_fence) for r in results] == [
        ("appended", 3), ("fenced", 5), ("fenced", 5),
    ]  # fmt: skip
    assert [e.event.data["n"] for e in await history.read_after("acme", 0, 10)] == [1]


async def test_a_partition_held_below_what_the_caller_appended_is_behind_and_nothing_is_added(
    history: History,
) -> None:
    """A history that failed over to a replica lacking the caller's last appends of a
    partition answers "behind" with what it holds (the caller re-reads from there); other
    partitions of the same call go on; a partition without a watermark is not behind."""
    await history.append_many(
        [("acme", [("streams", ev(i))], SourcePos("t", 0, i)) for i in range(3)], 1
    )
    results = await history.append_many(
        [
            ("acme", [("streams", ev(5))], SourcePos("t", 0, 5)),
            ("acme", [("streams", ev(6))], SourcePos("t", 0, 6)),
            ("globex", [("streams", ev(7, "globex"))], SourcePos("t", 1, 0)),
        ],
        1,
        expect={("t", 0): 4, ("t", 1): 9},  # partition 1 has no watermark: reset, not behind
    )
    assert [(r.status, r.watermark) for r in results[:2]] == [("behind", 2), ("behind", 2)]
    assert results[2].status == "appended"
    assert await history.watermark("t", 0) == 2
    assert [e.event.data["n"] for e in await history.read_after("acme", 0, 10)] == [0, 1, 2]
    again = await history.append_many(
        [("acme", [("streams", ev(3))], SourcePos("t", 0, 3))], 1, expect={("t", 0): 2}
    )
    assert again[0].status == "appended"
