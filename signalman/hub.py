"""The hub: tenant feeds that read the shared history and fan entries out to local sessions.

One feed task per tenant with local subscribers follows the tenant's history (Redis XREAD BLOCK or
the in-memory condition) and calls ``Session.offer`` for each entry, which never blocks: a slow
subscriber is dropped, it cannot slow the feed. Per-tenant connection caps are enforced here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import structlog

from pkg.clients.backoff import Backoff
from pkg.common.auth import Principal
from pkg.common.clock import SYSTEM_CLOCK, Clock
from signalman.history import History
from signalman.session import FeedRegistry, Session

log = structlog.get_logger("signalman.hub")


class TooManyConnections(Exception):
    """The tenant reached its connection cap on this replica."""


@dataclass
class Feed:
    tenant: str
    position: int = 0
    epoch: str = ""
    sessions: set[Session] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Hub(FeedRegistry):
    """Sessions of this replica and the feeds that serve them."""

    def __init__(
        self,
        history: History,
        *,
        buffer: int = 1_000,
        max_per_tenant: int = 100,
        max_channels: int = 16,
        poll_timeout: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.history = history
        self.buffer = buffer
        self.max_per_tenant = max_per_tenant
        self.max_channels = max_channels
        self.poll_timeout = poll_timeout
        self.clock = clock
        self.feeds: dict[str, Feed] = {}
        self.sessions: dict[str, Session] = {}
        self.per_tenant: dict[str, int] = {}
        self.dropped_total = 0
        self._ids = itertools.count(1)

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self, principal: Principal) -> Session:
        """A new session for ``principal``; raises ``TooManyConnections`` over the cap."""
        count = self.per_tenant.get(principal.tenant, 0)
        if count >= self.max_per_tenant:
            raise TooManyConnections(
                f"tenant {principal.tenant!r} already has {count} subscriber connections on this "
                f"replica (limit {self.max_per_tenant})"
            )
        session = Session(
            f"s{next(self._ids)}", principal, self.history, self, self.buffer, self.max_channels
        )
        self.sessions[session.id] = session
        self.per_tenant[principal.tenant] = count + 1
        return session

    def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        if session.dropped is not None and session.dropped.code == "RESOURCE_EXHAUSTED":
            self.dropped_total += 1
        session.close()
        tenant = session.principal.tenant
        self.per_tenant[tenant] = self.per_tenant.get(tenant, 1) - 1
        if self.per_tenant[tenant] <= 0:
            del self.per_tenant[tenant]

    def delivered(self) -> int:
        return sum(s.delivered for s in self.sessions.values())

    # -- feeds (FeedRegistry) ------------------------------------------------------------------
    async def attach(self, tenant: str, session: Session) -> int:
        feed = self.feeds.get(tenant)
        if feed is None:
            feed = self.feeds[tenant] = Feed(tenant)
            feed.task = asyncio.create_task(self._run_feed(feed), name=f"feed-{tenant}")
        await feed.ready.wait()
        # No await between reading the position and joining: the feed dispatches everything
        # after ``position`` to this session, the session replays everything up to it.
        feed.sessions.add(session)
        return feed.position

    def detach(self, tenant: str, session: Session) -> None:
        feed = self.feeds.get(tenant)
        if feed is None:
            return
        feed.sessions.discard(session)
        if not feed.sessions and feed.ready.is_set():
            self.feeds.pop(tenant, None)
            if feed.task is not None:
                feed.task.cancel()

    async def _run_feed(self, feed: Feed) -> None:
        backoff = Backoff(base=0.05, cap=2.0, clock=self.clock)  # jitter: feeds retry apart
        while True:
            try:
                if not feed.ready.is_set():
                    info = await self.history.info(feed.tenant)
                    feed.position, feed.epoch = info.head_offset, info.epoch
                    feed.ready.set()
                elif backoff.attempt:
                    # The history store was unreachable: it may have come back empty (a restart
                    # without persistence). Check before reading on from an old position.
                    await self._check_epoch(feed)
                entries = await self.history.wait_after(
                    feed.tenant, feed.position, self.poll_timeout
                )
                backoff.reset()
                if entries and entries[0].offset <= feed.position:
                    await self._check_epoch(feed)  # offsets went backwards: history was reset
                    continue
                if entries and feed.epoch and entries[0].epoch not in ("", feed.epoch):
                    # The store lost the history under a read that reconnected without an error
                    # (redis-py retries it): the new epoch's offsets restarted at 1 and are now
                    # past our position. Dispatching them under the old epoch would skip the
                    # ones below it without a gap.
                    await self._check_epoch(feed)
                    continue
                if not entries:
                    if not feed.sessions and self.feeds.get(feed.tenant) is feed:
                        self.feeds.pop(feed.tenant)  # everyone left while it was starting
                        return
                    await self._check_epoch(feed)
                    continue
                if not feed.epoch:
                    feed.epoch = (await self.history.info(feed.tenant)).epoch
                for entry in entries:
                    feed.position = entry.offset
                    for session in list(feed.sessions):
                        session.offer(feed.tenant, entry, feed.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("feed_read_failed", tenant=feed.tenant, error=repr(exc)[:200])
                await backoff.wait()

    async def _check_epoch(self, feed: Feed) -> None:
        """A lost history restarts offsets under a new epoch: subscribers must resume (and be
        told about the gap), so they are ended with UNAVAILABLE and reconnect."""
        info = await self.history.info(feed.tenant)
        if (feed.epoch and info.epoch != feed.epoch) or info.head_offset < feed.position:
            log.warning("history_epoch_changed", tenant=feed.tenant, old=feed.epoch, new=info.epoch)
            for session in list(feed.sessions):
                session.drop("UNAVAILABLE", "history epoch changed; resubscribe with resume")
            feed.position, feed.epoch = info.head_offset, info.epoch

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.drop("UNAVAILABLE", "replica shutting down; reconnect and resume")
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feed.task
        self.feeds.clear()
