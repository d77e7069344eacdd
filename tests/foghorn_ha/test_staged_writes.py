"""Load reports are staged, not awaited: applied locally at once, written behind with per node
one write in flight and one staged (newest wins), refusals close the stream, outages keep the
latest record for re-publication. Real redis-server throughout."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

import pytest

from api_balancing.ha.ownership import NodeOwnership
from api_balancing.model import NodeRecord
from api_balancing.sessions import Closed, SessionRegistry
from api_balancing.store import redis_codec
from api_balancing.store.base import StaleWriteError
from api_balancing.store.redis_store import RedisNodeStore
from pkg.coord import PutBatch
from tests.foghorn_ha.conftest import StoreFactory, eventually, make_record

pytestmark = pytest.mark.integration

# PutBatch args: 7 shared, then per put (fence, touch, id, state, version).
_SHARED, _PER_PUT = 7, 5


def _ids(batch: PutBatch) -> list[str]:
    return batch.args[_SHARED + 2 :: _PER_PUT]


def _cpus(batch: PutBatch) -> list[float]:
    states = batch.args[_SHARED + 3 :: _PER_PUT]
    return [redis_codec.decode(s).report.cpu_percent for s in states]  # type: ignore[union-attr]


def report(node_id: str, cpu: float, fence: int = 1) -> NodeRecord:
    return make_record(node_id, owner="a", fence=fence, cpu=cpu)


async def _redis_cpu(store: RedisNodeStore, node_id: str) -> float | None:
    raw = await store.redis.hget(store.keys.node(node_id), "rec")
    if raw is None:
        return None
    return redis_codec.decode(raw).report.cpu_percent  # type: ignore[union-attr]


async def _changelog_of(store: RedisNodeStore, node_id: str) -> list[int]:
    """Versions of the node's put entries in the changelog, in append order."""
    entries = await store.redis.xrange(store.log_key)
    return [int(f["ver"]) for _, f in entries if f.get("id") == node_id and f["op"] == "put"]


async def test_a_nodes_reports_staged_while_its_write_travels_coalesce_into_one_write(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    gate = asyncio.Event()
    sent: list[list[float]] = []
    put_batch = a._fenced.put_batch

    async def held_until_the_gate_opens(batch: PutBatch) -> Any:
        sent.append(_cpus(batch))
        await gate.wait()
        return await put_batch(batch)

    a._fenced.put_batch = held_until_the_gate_opens  # type: ignore[method-assign]
    await a.stage(report("n1", 1.0))
    await eventually(lambda: sent == [[1.0]])  # r1 is on the wire (held there)
    await a.stage(report("n1", 2.0))  # staged behind it: no wait
    third = asyncio.create_task(a.stage(report("n1", 3.0)))
    await eventually(lambda: a.get("n1").report.cpu_percent == 3.0)  # type: ignore[union-attr]
    assert not third.done(), "a third report waits for the in-flight write (backpressure)"
    assert sent == [[1.0]], "never two writes of one node in flight"
    gate.set()
    latest = await asyncio.wait_for(third, 10)
    await eventually(lambda: len(sent) == 2)
    assert sent[1] == [3.0], "report 2 was replaced by report 3 before it was sent"
    await eventually(lambda: _redis_cpu(a, "n1"), what="written")
    assert await _redis_cpu(a, "n1") == 3.0
    assert len(await _changelog_of(a, "n1")) == 2, "two writes for three reports"
    await eventually(lambda: (r := b.get("n1")) is not None and r.version == latest.version)
    assert a.staging.coalesced == 1 and a.staging.waits == 1


async def test_no_node_ever_has_two_writes_in_flight_and_redis_sees_them_in_order(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    flying: set[str] = set()
    overlaps: list[str] = []
    put_batch = a._fenced.put_batch

    async def tracking(batch: PutBatch) -> Any:
        ids = _ids(batch)
        overlaps.extend(i for i in ids if i in flying)
        flying.update(ids)
        try:
            await asyncio.sleep(0.002)  # let the next batch start while this one travels
            return await put_batch(batch)
        finally:
            flying.difference_update(ids)

    a._fenced.put_batch = tracking  # type: ignore[method-assign]

    async def node(i: int) -> None:
        for k in range(20):
            await a.stage(report(f"n{i}", float(k)))
            await asyncio.sleep(0)  # a control stream reads its next report

    await asyncio.gather(*(node(i) for i in range(40)))
    await eventually(lambda: len(a._writes) == 0, what="every staged write sent")
    assert overlaps == []
    for i in range(40):
        assert await _redis_cpu(a, f"n{i}") == 19.0, "the latest report is what Redis holds"
        versions = await _changelog_of(a, f"n{i}")
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert versions[-1] == a.get(f"n{i}").version  # type: ignore[union-attr]
    assert a.staging.staged == 800


async def test_a_staged_write_refused_by_redis_closes_the_nodes_stream_at_once(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    b = await store_factory("b")
    sessions = SessionRegistry()
    ours = NodeOwnership(a, sessions, ttl_s=15.0)
    theirs = NodeOwnership(b, SessionRegistry(), ttl_s=15.0)
    fence = await ours.acquire("n1")
    session = sessions.open("n1")
    await a.put(report("n1", 1.0, fence))
    await a.pause_sync()  # A does not hear of the takeover: only Redis can refuse A's write
    newer = await theirs.acquire("n1")
    await b.put(dataclasses.replace(report("n1", 5.0, newer), owner="b"))

    await a.stage(report("n1", 2.0, fence))  # accepted locally, refused when written
    closed = await asyncio.wait_for(session.outbox.get(), 10)  # no further report needed
    assert isinstance(closed, Closed) and closed.code == "ABORTED"
    assert ours.fence_of("n1") is None and session.closed
    assert a.counters.writes_rejected == 1
    with pytest.raises(StaleWriteError):
        await a.stage(report("n1", 3.0, fence))  # nothing more of ours is written
    assert await _redis_cpu(a, "n1") == 5.0
    a.resume_sync()
    await eventually(lambda: a.get("n1").owner == "b")  # type: ignore[union-attr]


async def test_staged_reports_during_a_redis_outage_are_written_when_it_returns(
    redis_factory: Any, store_factory: StoreFactory
) -> None:
    server = redis_factory()
    a = await store_factory("a", url=server.url)
    b = await store_factory("b", url=server.url)
    a.set_ownership_view(lambda node_id: 1)
    for i in range(3):
        await a.stage(report(f"n{i}", 1.0))
    await eventually(lambda: all(b.get(f"n{i}") is not None for i in range(3)))
    server.stop()
    for cpu in (2.0, 3.0, 4.0, 5.0):  # never raises: staged, then kept as dirty
        for i in range(3):
            await a.stage(report(f"n{i}", cpu))
    await eventually(lambda: not a.healthy())
    for i in range(3):
        await a.stage(report(f"n{i}", 6.0))
        assert a.get(f"n{i}").report.cpu_percent == 6.0  # type: ignore[union-attr]
    server.start()
    await eventually(lambda: a.healthy() and b.healthy())
    for i in range(3):
        await eventually(lambda i=i: b.get(f"n{i}").report.cpu_percent == 6.0)  # type: ignore[misc, union-attr]
        assert await _redis_cpu(a, f"n{i}") == 6.0
    assert len(a._writes) == 0


async def test_under_sustained_traffic_batches_leave_at_most_once_per_linger(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    launches: list[tuple[float, int]] = []
    launch = a._launch

    def recording() -> None:
        before = a.counters.batches
        launch()
        if a.counters.batches > before:
            launches.append((a._last_launch, a._last_batch))

    a._launch = recording  # type: ignore[method-assign]
    await a.stage(report("lone", 1.0))  # an idle store sends a lone write at once
    await eventually(lambda: len(a._writes) == 0)

    async def node(i: int) -> None:
        for k in range(30):
            await a.stage(report(f"n{i}", float(k)))
            await asyncio.sleep(0.001)  # reports faster than batches leave

    await asyncio.gather(*(node(i) for i in range(20)))
    await eventually(lambda: len(a._writes) == 0)
    assert launches[0][1] == 1
    gaps = [
        later - earlier for (earlier, size), (later, _) in itertools.pairwise(launches) if size > 1
    ]
    assert gaps and min(gaps) >= a.settings.linger_s * 0.99
    written = a.staging.staged - a.staging.coalesced
    assert written < a.staging.staged, "a node's reports within one linger coalesced"
    for i in range(20):
        assert await _redis_cpu(a, f"n{i}") == 29.0


async def test_flush_writes_every_staged_report_before_a_graceful_stop(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    for cpu in (1.0, 2.0, 3.0):
        for i in range(10):
            await a.stage(report(f"n{i}", cpu))  # nothing has been sent yet
    await a.flush()
    assert len(a._writes) == 0 and not a._flushes
    for i in range(10):
        assert await _redis_cpu(a, f"n{i}") == 3.0


async def test_a_staged_write_failing_after_newer_ones_were_deferred_does_not_win(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    a.set_ownership_view(lambda node_id: 1)
    real = a._fenced.put_batch
    gate = asyncio.Event()
    calls: list[list[float]] = []

    async def outage(batch: PutBatch) -> Any:
        calls.append(_cpus(batch))
        if len(calls) == 2:
            await gate.wait()  # the second write is still on the wire when newer ones come
        raise ConnectionError("redis went away")

    a._fenced.put_batch = outage  # type: ignore[method-assign]
    await a.stage(report("n1", 1.0))
    await eventually(lambda: len(calls) == 1)
    await a.stage(report("n1", 2.0))  # staged behind the first write
    await eventually(lambda: len(calls) == 2 and not a.healthy())
    await a.stage(report("n1", 3.0))  # degraded: kept as dirty, the newest
    a._fenced.put_batch = real  # type: ignore[method-assign]
    gate.set()  # report 2's write fails now, after report 3 was deferred
    await eventually(a.healthy, what="re-converged and re-published")
    await eventually(lambda: _redis_cpu(a, "n1"), what="written")
    assert await _redis_cpu(a, "n1") == 3.0


async def test_reports_deferred_while_republishing_are_published_before_healthy(
    store_factory: StoreFactory,
) -> None:
    a = await store_factory("a")
    a.set_ownership_view(lambda node_id: 1)
    real = a._fenced.put_batch
    state = {"down": True, "arrived": False}

    async def flaky(batch: PutBatch) -> Any:
        if state["down"]:
            raise ConnectionError("redis went away")
        if not state["arrived"]:  # the re-publication's batch: a report arrives meanwhile
            state["arrived"] = True
            await a.stage(report("n1", 3.0))  # still degraded: deferred
        return await real(batch)

    a._fenced.put_batch = flaky  # type: ignore[method-assign]
    await a.stage(report("n1", 1.0))
    await eventually(lambda: not a.healthy())
    await a.stage(report("n1", 2.0))
    state["down"] = False
    await eventually(a.healthy)
    assert state["arrived"]
    assert await _redis_cpu(a, "n1") == 3.0, "the report deferred during re-publication too"
    assert not a.is_dirty("n1")
