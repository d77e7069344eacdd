"""The hub: one tail that reads the shared history and fans entries out to local sessions.

A replica keeps a feed per tenant with local subscribers (its position and epoch) and one tail
task that follows all of them with a single read (``History.wait_many``: one Redis XREAD BLOCK
over every tenant's stream, or the in-memory condition), then calls ``Session.offer`` for each
entry, which never blocks: a slow subscriber is dropped, it cannot slow the tail. A new feed
interrupts the read in flight so that it is included at once. Per-tenant connection caps are
enforced here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from dataclasses import dataclass, field

import structlog

from pkg.clients.backoff import Backoff
from pkg.common import tracing
from pkg.common.auth import Principal
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.metrics import Metrics, per_source
from signalman.history import Entry, History, HistoryInfo
from signalman.session import FeedPosition, FeedRegistry, Session
from signalman.tracing import deliver_span

log = structlog.get_logger("signalman.hub")

# Entries a feed keeps after dispatching them, per tenant: a subscriber resuming from an offset
# this close to the head (a replica's subscribers moving here after it died) is replayed from
# memory, with no history read a burst could queue up behind.
RECENT_ENTRIES = 256


class TooManyConnections(Exception):
    """The tenant reached its connection cap on this replica."""


@dataclass
class Feed:
    tenant: str
    position: int = 0
    epoch: str = ""
    sessions: set[Session] = field(default_factory=set)
    task: asyncio.Task[None] | None = None  # start-up: reads the position, then the tail has it
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ready_at: float = 0.0  # when it started (monotonic)
    checked_at: float = 0.0  # last time entries arrived or the epoch was checked (monotonic)
    # The latest dispatched entries, contiguous, ending at ``position``.
    recent: collections.deque[Entry] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_ENTRIES)
    )


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
        self._tail: asyncio.Task[None] | None = None
        self._reading = False  # the tail is waiting in its read (and only there)
        self._interrupted = False  # ... and was cancelled to start another read
        self._closing = False
        self._wake = asyncio.Event()  # a feed became ready while the tail had none to read
        self._epochs_due_at = 0.0  # next check of quiet tenants' epochs (monotonic)

    def register_metrics(self, registry: Metrics) -> None:
        """Subscribers here and the slow ones dropped, on /metrics (read at scrape time)."""
        registry.gauge(
            "signalman_subscribers",
            "subscriber sessions open on this replica",
            per_source(lambda _: {}, lambda hub: len(hub.sessions)),
            (),
            self,
        )
        registry.counter(
            "signalman_subscribers_dropped_total",
            "subscribers dropped because they did not read fast enough",
            per_source(lambda _: {}, lambda hub: hub.dropped_total),
            (),
            self,
        )

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
    async def attach(self, tenant: str, session: Session) -> FeedPosition:
        feed = self.feeds.get(tenant)
        if feed is None:
            feed = self.feeds[tenant] = Feed(tenant)
            feed.task = asyncio.create_task(self._start_feed(feed), name=f"feed-{tenant}")
        await feed.ready.wait()
        # No await between reading the position and joining: the tail dispatches everything
        # after ``position`` to this session, the session replays everything up to it.
        feed.sessions.add(session)
        return FeedPosition(feed.position, feed.epoch)

    def recent(self, tenant: str, after: int, upto: int) -> list[Entry] | None:
        feed = self.feeds.get(tenant)
        if feed is None or not feed.recent or feed.recent[0].offset > after + 1:
            return None
        if upto > feed.recent[-1].offset:
            return None
        return [e for e in feed.recent if after < e.offset <= upto]

    def detach(self, tenant: str, session: Session) -> None:
        feed = self.feeds.get(tenant)
        if feed is None:
            return
        feed.sessions.discard(session)
        if not feed.sessions and feed.ready.is_set():
            self.feeds.pop(tenant, None)  # the tail stops reading it at its next read

    async def _start_feed(self, feed: Feed) -> None:
        """Where a new feed starts (the history's head), then hand it to the tail."""
        backoff = Backoff(base=0.05, cap=2.0, clock=self.clock)  # jitter: feeds retry apart
        while True:
            try:
                info = await self.history.info(feed.tenant)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("feed_start_failed", tenant=feed.tenant, error=repr(exc)[:200])
                await backoff.wait()
        feed.position, feed.epoch = info.head_offset, info.epoch
        feed.ready_at = feed.checked_at = self.clock.monotonic()
        feed.ready.set()
        feed.task = None
        if self._tail is None or self._tail.done():
            self._tail = asyncio.create_task(self._run_tail(), name="history-tail")
        elif self._reading and not self._interrupted:
            # The read in flight does not include this feed: start another one that does
            # (redis-py closes the connection of a cancelled blocking read; once per new tenant).
            self._interrupted = True
            self._tail.cancel()
        self._wake.set()

    def _tailed(self) -> dict[str, Feed]:
        """Feeds the tail reads. One without sessions is one that everyone left while it was
        starting (the last to leave a started feed removes it): forgotten after a while, never
        before its first subscribers have had the time to join it."""
        tailed = {}
        now = self.clock.monotonic()
        for tenant, feed in list(self.feeds.items()):
            if not feed.ready.is_set():
                continue
            if not feed.sessions and now - feed.ready_at >= self.poll_timeout:
                self.feeds.pop(tenant)
                continue
            tailed[tenant] = feed
        return tailed

    async def _run_tail(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0, clock=self.clock)
        while True:
            feeds = self._tailed()
            if not feeds:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if backoff.attempt:
                    # The history store was unreachable: it may have come back empty (a restart
                    # without persistence). Check before reading on from old positions.
                    await self._check_epochs(list(feeds.values()))
                # Interruptible by a new feed (cancelled, then un-cancelled): a task per read to
                # cancel instead would cost one more task and two more steps per wake-up.
                self._reading = True
                try:
                    got = await self.history.wait_many(
                        {t: f.position for t, f in feeds.items()}, self.poll_timeout
                    )
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not self._interrupted or self._closing or task is None:
                        raise
                    task.uncancel()
                    continue  # a new feed joins the next read
                finally:
                    self._reading = self._interrupted = False
                backoff.reset()
                now = self.clock.monotonic()
                for tenant, entries in got.items():
                    feed = feeds[tenant]
                    if self.feeds.get(tenant) is feed:  # (not left meanwhile)
                        await self._dispatch(feed, entries)
                        feed.checked_at = now
                # A quiet tenant's history may have been lost under reads that reconnected
                # without an error (redis-py retries them): check it now and then, every quiet
                # tenant in one round trip at most once per poll_timeout (so within two of its
                # last entry). Checked as each became due, tenants that get an event every few
                # seconds came due one or two at a time: one more round trip at nearly every
                # wake-up (100 tenants at 0.5 events/s each: ~50 a second, 3-4% of a replica's
                # samples in the 10,000-subscriber fan-out, 02:28 UTC).
                if now >= self._epochs_due_at:
                    self._epochs_due_at = now + self.poll_timeout
                    due = [f for f in feeds.values() if now - f.checked_at >= self.poll_timeout]
                    if due:
                        await self._check_epochs(due)
                        for feed in due:
                            feed.checked_at = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("tail_read_failed", tenants=len(feeds), error=repr(exc)[:200])
                await backoff.wait()

    async def _dispatch(self, feed: Feed, entries: list[Entry]) -> None:
        if entries[0].offset <= feed.position:
            await self._check_epoch(feed)  # offsets went backwards: history was reset
            return
        if feed.epoch and entries[0].epoch not in ("", feed.epoch):
            # The store lost the history under a read that reconnected without an error
            # (redis-py retries it): the new epoch's offsets restarted at 1 and are now past our
            # position. Dispatching them under the old epoch would skip the ones below it
            # without a gap.
            await self._check_epoch(feed)
            return
        if not feed.epoch:
            feed.epoch = (await self.history.info(feed.tenant)).epoch
        tenant, epoch = feed.tenant, feed.epoch
        if entries[0].offset != feed.position + 1:
            feed.recent.clear()  # trimmed under a slow tail: what it kept is no longer contiguous
        feed.recent.extend(entries)
        for entry in entries:
            feed.position = entry.offset
            span = None
            if entry.trace and tracing.ENABLED:
                span = deliver_span(entry.trace, tenant, entry.offset, len(feed.sessions))
            for session in list(feed.sessions):
                session.offer(tenant, entry, epoch)
            if span is not None:
                span.end()

    async def _check_epochs(self, feeds: list[Feed]) -> None:
        """``_check_epoch`` for several feeds, their histories read in one round trip."""
        infos = await self.history.info_many([feed.tenant for feed in feeds])
        for feed, info in zip(feeds, infos, strict=True):
            self._apply_epoch(feed, info)

    async def _check_epoch(self, feed: Feed) -> None:
        """A lost history restarts offsets under a new epoch: subscribers must resume (and be
        told about the gap), so they are ended with UNAVAILABLE and reconnect."""
        self._apply_epoch(feed, await self.history.info(feed.tenant))

    def _apply_epoch(self, feed: Feed, info: HistoryInfo) -> None:
        if (feed.epoch and info.epoch != feed.epoch) or info.head_offset < feed.position:
            log.warning("history_epoch_changed", tenant=feed.tenant, old=feed.epoch, new=info.epoch)
            for session in list(feed.sessions):
                session.drop("UNAVAILABLE", "history epoch changed; resubscribe with resume")
            feed.position, feed.epoch = info.head_offset, info.epoch
            feed.recent.clear()

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.drop("UNAVAILABLE", "replica shutting down; reconnect and resume")
        self._closing = True
        tasks = [f.task for f in self.feeds.values() if f.task is not None]
        if self._tail is not None:
            tasks.append(self._tail)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tail = None
        self.feeds.clear()
