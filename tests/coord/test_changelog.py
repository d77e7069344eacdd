"""The changelog: ordered replay after a cursor, own entries skipped, gaps detected."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from pkg.coord import Announce, Changelog, ChangelogSet, FencedHash, GapDetected, PutBatch
from pkg.coord.changelog import Position, parse_id
from tests.waiting import eventually

pytestmark = pytest.mark.integration


async def test_reader_gets_entries_in_order_and_skips_its_own(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log")
    reader = log.reader(skip_origin="b")
    for i in range(5):
        await log.append("a" if i % 2 == 0 else "b", {"i": str(i)})
    entries = await reader.read(block_ms=100)
    assert [e.fields["i"] for e in entries] == ["0", "2", "4"]
    assert all(e.origin == "a" for e in entries)
    assert reader.position == await log.tail(), "own entries still move the cursor"
    assert await reader.read(block_ms=50) == []


@pytest.mark.parametrize("decode", [True, False])
async def test_entries_are_text_whatever_the_clients_decoding(
    redis_server: Any, prefix: str, decode: bool
) -> None:
    # The reader takes XREAD replies undecoded (own entries skipped on raw bytes) and decodes
    # only what it keeps: UTF-8 values and IDs must come out as text on either kind of client.
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=decode)
    try:
        log = Changelog(client, f"{prefix}:log")
        reader = log.reader(skip_origin="r\u00e9plica")
        await log.append("r\u00e9plica", {"i": "own"})
        await log.append("other", {"i": "Z\u00fcrich \u2192 \u6771\u4eac"})
        entries = await reader.read(block_ms=100)
        assert [(e.origin, dict(e.fields)) for e in entries] == [
            ("other", {"i": "Z\u00fcrich \u2192 \u6771\u4eac"})
        ]
        assert isinstance(entries[0].id, str)
        assert reader.position == await log.tail()
    finally:
        await client.aclose()


async def test_every_kind_of_writer_is_skipped_by_origin_and_read_by_the_others(
    redis: aioredis.Redis, prefix: str
) -> None:
    stream = f"{prefix}:log"
    log = Changelog(redis, stream)
    fenced = FencedHash(redis)
    mine, theirs = log.reader(skip_origin="me"), log.reader(skip_origin="other")
    await log.append("other", {"i": "0"})
    batch = PutBatch(stream, origin="me", maxlen=100)  # origin right after n
    batch.add(f"{prefix}:h1", f"{prefix}:o1", 1, "h1", "state-1", 1)
    await fenced.put_batch(batch)
    # origin elsewhere in the entry: found the slow way, still skipped
    announce = Announce(stream, maxlen=100, fields={"op": "x", "origin": "me", "i": "2"})
    await fenced.write(f"{prefix}:h2", f"{prefix}:o2", 1, {"v": "1"}, announce=announce)
    await log.append("other", {"i": "3"})
    assert [e.fields["i"] for e in await mine.read(block_ms=100)] == ["0", "3"]
    got = await theirs.read(block_ms=100)
    assert [(e.origin, e.fields.get("state") or e.fields.get("i")) for e in got] == [
        ("me", "state-1"),
        ("me", "2"),
    ]
    assert mine.position == theirs.position == await log.tail()


async def test_tail_first_reader_sees_only_what_follows_the_tail(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log")
    assert await log.tail() == Position()
    await log.append("a", {"i": "old"})
    reader = log.reader(await log.tail())
    await log.append("a", {"i": "new"})
    assert [e.fields["i"] for e in await reader.read(block_ms=100)] == ["new"]


async def test_blocking_read_wakes_up_when_an_entry_arrives(redis_server: Any, prefix: str) -> None:
    writer = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    reader_conn = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        log = Changelog(writer, f"{prefix}:log")
        reader = Changelog(reader_conn, f"{prefix}:log").reader()
        pending = asyncio.create_task(reader.read(block_ms=10_000))

        async def reader_blocked() -> bool:
            return int((await writer.info("clients"))["blocked_clients"]) >= 1

        # The read must really be blocked in Redis before the entry arrives: otherwise it
        # would simply find the entry and the test would not show a wake-up.
        await eventually(reader_blocked, timeout=10)
        assert not pending.done()
        await log.append("a", {"x": "1"})
        entries = await asyncio.wait_for(pending, timeout=5)
        assert [e.fields for e in entries] == [{"x": "1"}]
    finally:
        await writer.aclose()
        await reader_conn.aclose()


async def test_trimmed_past_the_cursor_is_a_gap_and_reset_recovers(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log", maxlen=3, exact_trim=True)
    reader = log.reader()
    await log.append("a", {"i": "0"})
    assert len(await reader.read(block_ms=50)) == 1
    for i in range(1, 8):
        await log.append("a", {"i": str(i)})
    with pytest.raises(GapDetected, match="trimmed"):
        await reader.read(block_ms=50)
    reader.reset(await log.tail())
    await log.append("a", {"i": "8"})
    assert [e.fields["i"] for e in await reader.read(block_ms=50)] == ["8"]


async def test_a_reader_within_the_bound_sees_no_gap(redis: aioredis.Redis, prefix: str) -> None:
    log = Changelog(redis, f"{prefix}:log", maxlen=5, exact_trim=True)
    reader = log.reader()
    seen: list[str] = []
    for round_ in range(4):
        for i in range(4):
            await log.append("a", {"i": f"{round_}.{i}"})
        seen += [e.fields["i"] for e in await reader.read(block_ms=50)]
    assert len(seen) == 16


async def test_stream_and_counter_lost_after_reading_is_a_gap(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log")
    reader = log.reader()
    for i in range(3):
        await log.append("a", {"i": str(i)})
    await reader.read(block_ms=50)
    await redis.delete(log.key, log.seq_key)  # what a Redis restart without persistence does
    # A real restart takes far longer than a millisecond. Without that pause, the new stream's
    # time-based IDs can fall in the very millisecond of the cursor, below it, where XREAD
    # never returns them (a limit noted in docs/rfcs/foghorn-ha.md; the sync loop also
    # detects restarts by Redis run_id).
    await asyncio.sleep(0.005)
    await log.append("a", {"i": "after"})
    await log.append("a", {"i": "after2"})
    with pytest.raises(GapDetected, match="restarted"):
        await reader.read(block_ms=50)


async def test_entries_are_numbered_without_holes_across_writers(
    redis_server: Any, prefix: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_server.url, decode_responses=True) for _ in range(3)]
    try:
        logs = [Changelog(c, f"{prefix}:log") for c in clients]
        await asyncio.gather(
            *(lg.append(str(i), {"k": str(j)}) for i, lg in enumerate(logs) for j in range(20))
        )
        numbers = [int(f["n"]) for _, f in await clients[0].xrange(f"{prefix}:log")]
        assert numbers == list(range(1, 61))
        assert (await logs[0].tail()).index == 60
    finally:
        for c in clients:
            await c.aclose()


async def test_redis_restart_is_a_gap_on_the_next_successful_read(
    redis_factory: Any, prefix: str
) -> None:
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        log = Changelog(client, f"{prefix}:log")
        reader = log.reader()
        await log.append("a", {"i": "0"})
        await reader.read(block_ms=50)
        server.restart()
        for _ in range(50):
            try:
                await reader.read(block_ms=50)
            except GapDetected as gap:
                assert "lost" in gap.reason or "vanished" in gap.reason
                break
            except (OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no gap reported after Redis restarted")
    finally:
        await client.aclose()


def test_ids_compare_numerically() -> None:
    assert parse_id("10-0") > parse_id("9-5")
    assert parse_id("5-10") > parse_id("5-9")


async def test_trimming_exactly_what_the_reader_consumed_is_no_gap(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log", maxlen=3, exact_trim=True)
    reader = log.reader()
    for i in range(3):
        await log.append("a", {"i": str(i)})
    assert len(await reader.read(block_ms=50)) == 3
    for i in range(3, 6):
        await log.append("a", {"i": str(i)})  # trims 0..2, all consumed
    assert [e.fields["i"] for e in await reader.read(block_ms=50)] == ["3", "4", "5"]
    await log.append("a", {"i": "6"})  # trims 3: consumed too
    assert [e.fields["i"] for e in await reader.read(block_ms=50)] == ["6"]


async def test_reader_from_the_start_of_a_trimmed_stream_reports_the_gap(
    redis: aioredis.Redis, prefix: str
) -> None:
    log = Changelog(redis, f"{prefix}:log", maxlen=2, exact_trim=True)
    for i in range(4):
        await log.append("a", {"i": str(i)})
    with pytest.raises(GapDetected):
        await log.reader().read(block_ms=50)


# -- one stream per writer, read as one set ---------------------------------------------------


async def test_a_set_reads_each_writers_stream_in_order_and_nothing_of_its_own(
    redis: aioredis.Redis, prefix: str
) -> None:
    logs = {name: Changelog(redis, f"{prefix}:log:{name}") for name in ("a", "b", "c")}
    reader_of_a = ChangelogSet(redis, watch=f"{prefix}:watch")
    for name in ("b", "c"):  # a reads the others' streams only
        reader_of_a.add(logs[name].key)
    for i in range(4):
        for name, log in logs.items():
            await log.append(name, {"i": str(i)})
    entries = await reader_of_a.read(block_ms=100)
    by_origin = {o: [e.fields["i"] for e in entries if e.origin == o] for o in ("a", "b", "c")}
    assert by_origin == {"a": [], "b": ["0", "1", "2", "3"], "c": ["0", "1", "2", "3"]}
    assert reader_of_a.positions[logs["b"].key] == await logs["b"].tail()
    tails = await ChangelogSet.tails(redis, [logs["b"].key, logs["c"].key, f"{prefix}:none"])
    assert tails[f"{prefix}:none"] == Position() and tails[logs["c"].key].index == 4
    assert await reader_of_a.read(block_ms=50) == []


async def test_a_gap_in_one_stream_of_the_set_is_detected_and_reset_recovers(
    redis: aioredis.Redis, prefix: str
) -> None:
    small = Changelog(redis, f"{prefix}:log:b", maxlen=3, exact_trim=True)
    other = Changelog(redis, f"{prefix}:log:c")
    reader = ChangelogSet(redis)
    reader.add(small.key)
    reader.add(other.key)
    await small.append("b", {"i": "0"})
    await other.append("c", {"i": "0"})
    assert len(await reader.read(block_ms=100)) == 2
    for i in range(1, 10):  # b's stream keeps 3: entries after the cursor are gone
        await small.append("b", {"i": str(i)})
    with pytest.raises(GapDetected, match="trimmed"):
        await reader.read(block_ms=100)
    reader.reset(await ChangelogSet.tails(redis, [small.key, other.key]))
    await other.append("c", {"i": "1"})
    assert [e.fields["i"] for e in await reader.read(block_ms=100)] == ["1"]


async def test_a_stream_joining_later_is_read_from_its_first_entry_after_a_wake_up(
    redis: aioredis.Redis, prefix: str
) -> None:
    watch = f"{prefix}:watch"
    reader = ChangelogSet(redis, watch=watch)
    pending = asyncio.create_task(reader.read(block_ms=5000))
    await asyncio.sleep(0.1)  # blocked on the watch stream alone
    late = Changelog(redis, f"{prefix}:log:late")
    await redis.xadd(watch, {"replica": "late"})  # announced before its first write
    await late.append("late", {"i": "0"})
    assert await asyncio.wait_for(pending, 5) == []
    assert reader.watch_fired, "the reader is told to look at its registry"
    assert reader.add(late.key) and not reader.add(late.key)
    assert [e.fields["i"] for e in await reader.read(block_ms=100)] == ["0"]
    # A stream first seen past its first entry (trimmed before it was read) is a gap.
    trimmed = Changelog(redis, f"{prefix}:log:old", maxlen=2, exact_trim=True)
    for i in range(5):
        await trimmed.append("old", {"i": str(i)})
    reader.add(trimmed.key)
    with pytest.raises(GapDetected):
        await reader.read(block_ms=100)
