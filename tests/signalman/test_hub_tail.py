"""The hub's tail: one read for every tenant a replica serves, interrupted when a tenant joins.

Driven through sessions on the in-memory history and, for the shared read, Redis (the same tail
runs on both); delivery through the wire API is covered by ``test_service.py`` and the replica
tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pkg.common.auth import Principal
from pkg.events import Event
from signalman.history import History, SourcePos
from signalman.history.memory import MemoryHistory
from signalman.history.redis import RedisHistory
from signalman.hub import Hub
from signalman.session import ChannelRequest, OutEvent, Session
from tests.signalman.conftest import wait_until


@pytest.fixture(params=["memory", "redis"])
async def history(request: pytest.FixtureRequest) -> AsyncIterator[History]:
    if request.param == "memory":
        yield MemoryHistory()
        return
    server: Any = request.getfixturevalue("redis_server")
    store = RedisHistory(server.url, prefix=f"h{uuid.uuid4().hex[:8]}")
    try:
        yield store
    finally:
        await store.close()


async def subscribe(hub: Hub, tenant: str) -> Session:
    session = hub.open_session(Principal("reader", tenant, frozenset({"reader"})))
    await session.subscribe(1, [ChannelRequest("streams")])
    return session


def events_of(session: Session) -> list[int]:
    return [item.entry.event.data["n"] for item in list(session.queue._queue)  # type: ignore[attr-defined]
            if isinstance(item, OutEvent)]  # fmt: skip


async def append(history: History, tenant: str, n: int, offset: int) -> None:
    event = Event("stream.started", tenant, {"n": n})
    await history.append(tenant, [("streams", event)], SourcePos("t", 0, offset), 1)


async def test_a_tenant_joining_while_the_tail_waits_is_served_at_once(history: History) -> None:
    # A read that waits up to a minute: a tenant that joined meanwhile must not wait for it.
    hub = Hub(history, poll_timeout=60.0)
    try:
        acme = await subscribe(hub, "acme")
        await asyncio.sleep(0.2)  # the tail is now blocked in a read of acme's history alone
        globex = await subscribe(hub, "globex")
        await append(history, "globex", 1, 0)
        await wait_until(lambda: events_of(globex) == [1], timeout=5)
        await append(history, "acme", 2, 1)
        await wait_until(lambda: events_of(acme) == [2], timeout=5)
        assert events_of(globex) == [1]  # tenants never see each other's events
    finally:
        await hub.close()


async def test_one_tail_serves_every_tenant_in_order(history: History) -> None:
    hub = Hub(history, poll_timeout=1.0)
    tenants = [f"t{i}" for i in range(5)]
    try:
        sessions = {t: await subscribe(hub, t) for t in tenants}
        for n in range(40):
            await append(history, tenants[n % 5], n, offset=n)
        for i, tenant in enumerate(tenants):
            await wait_until(lambda s=sessions[tenant]: len(events_of(s)) == 8, timeout=5)
            assert events_of(sessions[tenant]) == list(range(i, 40, 5))
        assert hub._tail is not None and len(hub.feeds) == 5
    finally:
        await hub.close()


async def test_a_feed_everyone_left_is_no_longer_read(history: History) -> None:
    hub = Hub(history, poll_timeout=0.2)
    try:
        session = await subscribe(hub, "acme")
        hub.close_session(session)
        assert "acme" not in hub.feeds
        other = await subscribe(hub, "globex")
        await append(history, "globex", 1, 0)
        await wait_until(lambda: events_of(other) == [1], timeout=5)
    finally:
        await hub.close()


class CountingHistory:
    """A history that counts the reads a subscribe makes (everything else passes through)."""

    def __init__(self, inner: History) -> None:
        self.inner = inner
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def info(self, tenant: str) -> Any:
        self.reads.append("info")
        return await self.inner.info(tenant)

    async def read_after(self, tenant: str, after: int, limit: int) -> Any:
        self.reads.append("read_after")
        return await self.inner.read_after(tenant, after, limit)

    async def info_many(self, tenants: list[str]) -> Any:
        self.reads.append("info_many")
        return await self.inner.info_many(tenants)


async def test_subscribes_near_the_head_are_served_from_the_feed_without_history_reads(
    history: History,
) -> None:
    counting = CountingHistory(history)
    hub = Hub(counting, poll_timeout=60.0)  # type: ignore[arg-type]
    try:
        first = await subscribe(hub, "acme")
        for n in range(1, 6):
            await append(history, "acme", n, offset=n)
        await wait_until(lambda: events_of(first) == [1, 2, 3, 4, 5], timeout=5)
        epoch = (await history.info("acme")).epoch
        counting.reads.clear()
        fresh = await subscribe(hub, "acme")
        resumed = hub.open_session(Principal("reader", "acme", frozenset({"reader"})))
        await resumed.subscribe(1, [ChannelRequest("streams", True, 2, epoch)])
        caught_up = hub.open_session(Principal("reader", "acme", frozenset({"reader"})))
        await caught_up.subscribe(1, [ChannelRequest("streams", True, 5, epoch)])
        assert counting.reads == []
        assert events_of(fresh) == []
        assert events_of(resumed) == [3, 4, 5]
        assert events_of(caught_up) == []
        # Further back than the feed remembers (it started at offset 0 here, so from 0 on it
        # has everything): a resume from an older epoch reads the history and hears of the gap.
        older = hub.open_session(Principal("reader", "acme", frozenset({"reader"})))
        await older.subscribe(1, [ChannelRequest("streams", True, 2, "lost-epoch")])
        assert "info" in counting.reads
        assert events_of(older) == [1, 2, 3, 4, 5]
    finally:
        await hub.close()


async def test_a_resume_past_the_feed_but_within_the_history_is_not_delivered_twice(
    history: History,
) -> None:
    # The feed trails the history by the read in flight: a client resuming from an offset the
    # feed has not dispatched yet (it came from another replica) gets only what follows it.
    hub = Hub(history, poll_timeout=60.0)
    try:
        await subscribe(hub, "acme")
        hub._dispatch = _stall  # type: ignore[method-assign]  # the tail reads, dispatches nothing
        for n in range(1, 4):
            await append(history, "acme", n, offset=n)
        epoch = (await history.info("acme")).epoch
        session = hub.open_session(Principal("reader", "acme", frozenset({"reader"})))
        await session.subscribe(1, [ChannelRequest("streams", True, 2, epoch)])
        assert session.subs["streams"].live_from == 2
        entries = await history.read_after("acme", 0, 10)
        for entry in entries:
            session.offer("acme", entry, epoch)
        assert events_of(session) == [3]
    finally:
        await hub.close()


async def _stall(*_: Any) -> None:
    return None


async def test_quiet_tenants_epochs_are_checked_together_at_most_once_per_poll_timeout(
    history: History,
) -> None:
    # Tenants that each get an event now and then come due for the check at different times:
    # they must be checked in one round trip per poll_timeout, not one per tail wake-up.
    counting = CountingHistory(history)
    hub = Hub(counting, poll_timeout=0.2)  # type: ignore[arg-type]
    tenants = [f"t{i}" for i in range(20)]
    try:
        sessions = [await subscribe(hub, t) for t in tenants]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(60):  # one event every 15 ms: each tenant gets one every 0.3 s
            await append(history, tenants[i % len(tenants)], i, i + 1)
            await asyncio.sleep(0.015)
        await wait_until(lambda: all(len(events_of(s)) == 3 for s in sessions))
        elapsed = loop.time() - started
        checks = counting.reads.count("info_many")
        # Checked as each tenant came due, it was about one round trip per event (60).
        assert 1 <= checks <= elapsed / 0.2 + 2, (checks, elapsed)
    finally:
        await hub.close()
