"""One subscriber's session: its subscriptions, resume logic and bounded outgoing queue.

The session never talks gRPC: it produces ``Out*`` messages that the wire layer converts. Live
entries arrive from the tenant feed through ``offer`` (never blocks: a full queue drops the
session); resume replays history first while live entries wait in a bounded backlog, so the client
sees replay then live with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from pkg.common.auth import Principal
from signalman.channels import check_subscribable, history_tenant, matches
from signalman.history import Entry, History

REPLAY_CHUNK = 200


# Bytes a batched event adds beyond its body (channel, offset, epoch, field tags).
EVENT_FRAMING = 64


@dataclass(frozen=True)
class OutEvent:
    subscription: str
    epoch: str
    entry: Entry


@dataclass(frozen=True)
class OutSubscribed:
    request_id: int
    channel: str
    epoch: str
    head_offset: int


@dataclass(frozen=True)
class OutUnsubscribed:
    request_id: int
    channel: str


@dataclass(frozen=True)
class OutPong:
    request_id: int
    nonce: int


@dataclass(frozen=True)
class OutError:
    request_id: int
    code: str  # grpc status code name
    message: str
    field: str = ""


@dataclass(frozen=True)
class OutGap:
    request_id: int
    channel: str
    epoch: str
    requested_after: int
    requested_epoch: str
    resumed_from: int
    reason: str


@dataclass(frozen=True)
class Dropped:
    """The session must end with ``code`` and ``message``."""

    code: str
    message: str


Out = OutEvent | OutSubscribed | OutUnsubscribed | OutPong | OutError | OutGap | Dropped


@dataclass
class Subscription:
    channel: str
    tenant: str  # whose history it reads
    live_from: int  # entries at or below this offset were (or will be) replayed
    epoch: str = ""
    replaying: bool = False
    backlog: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class ChannelRequest:
    channel: str
    resume: bool = False
    after_offset: int = 0
    epoch: str = ""


@dataclass(frozen=True)
class FeedPosition:
    """Where a tenant's feed on this replica stands: everything up to ``offset`` (in ``epoch``)
    was dispatched before the session joined; everything after it will be offered to it."""

    offset: int
    epoch: str


class FeedRegistry:
    """What a session needs from the hub: join a tenant feed, learn its position, and read the
    entries the feed dispatched lately (a resume near the head needs no history read)."""

    async def attach(  # pragma: no cover - protocol
        self, tenant: str, session: Session
    ) -> FeedPosition:
        """Register ``session`` on ``tenant``'s feed; returns where the feed stands."""
        raise NotImplementedError

    def recent(  # pragma: no cover - protocol
        self, tenant: str, after: int, upto: int
    ) -> list[Entry] | None:
        """The entries ``after`` < offset <= ``upto`` if the feed still holds all of them."""
        raise NotImplementedError

    def detach(self, tenant: str, session: Session) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


class Outgoing:
    """A session's queue of what to send: one reader (its writer task), bounded by hand.

    ``asyncio.Queue`` carries three deques and an ``Event`` per instance (~2 KB per subscriber,
    out of ~36 KB) and the bookkeeping of several readers and writers on every get and put; a
    session has one of each side, so a deque and one waiter future do the same job.
    """

    __slots__ = ("_queue", "_waiter")

    def __init__(self) -> None:
        self._queue: collections.deque[Out] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Out) -> None:
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._queue)

    def empty(self) -> bool:
        return not self._queue

    def peek(self) -> Out:
        return self._queue[0]

    def get_nowait(self) -> Out:
        return self._queue.popleft()

    async def get(self) -> Out:
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


class Session:
    """A subscriber on this replica. ``queue`` holds what to send, in order."""

    def __init__(
        self,
        session_id: str,
        principal: Principal,
        history: History,
        feeds: FeedRegistry,
        buffer: int,
        max_channels: int = 16,
    ) -> None:
        self.id = session_id
        self.principal = principal
        self.history = history
        self.feeds = feeds
        self.buffer = buffer
        self.max_channels = max_channels
        self.queue = Outgoing()  # bounded by hand in offer()
        self.subs: dict[str, Subscription] = {}
        self.dropped: Dropped | None = None
        self.delivered = 0
        self._room = asyncio.Event()
        self._room.set()
        # Set by the wire layer: ends the call at once, even while a write to the client blocks.
        self.on_drop: Callable[[Dropped], None] | None = None

    # -- called by the tenant feed ---------------------------------------------------------------
    def offer(self, tenant: str, entry: Entry, epoch: str) -> None:
        """Queue a live entry for every matching subscription; never blocks."""
        if self.dropped is not None:
            return
        for sub in self.subs.values():
            if sub.tenant != tenant or not matches(sub.channel, entry.channel):
                continue
            if entry.offset <= sub.live_from:
                continue
            if sub.replaying:
                sub.backlog.append(entry)
                if len(sub.backlog) > self.buffer:
                    self.drop_slow()
                    return
                continue
            if self.queue.qsize() >= self.buffer:
                self.drop_slow()
                return
            self.queue.put_nowait(OutEvent(sub.channel, epoch, entry))

    def drop_slow(self) -> None:
        self.drop(
            "RESOURCE_EXHAUSTED",
            f"subscriber too slow: more than {self.buffer} events waiting; reconnect and resume "
            "from your last offset",
        )

    def drop(self, code: str, message: str) -> None:
        if self.dropped is None:
            self.dropped = Dropped(code, message)
            self.queue.put_nowait(self.dropped)  # unbounded underneath: always fits
            if self.on_drop is not None:
                self.on_drop(self.dropped)

    # -- called by the writer ---------------------------------------------------------------------
    async def next_out(self) -> Out:
        item = await self.queue.get()
        if self.queue.qsize() < self.buffer // 2 + 1:
            self._room.set()
        if isinstance(item, OutEvent):
            self.delivered += 1
        return item

    def take_events(self, limit: int, max_bytes: int = 0) -> list[OutEvent]:
        """Up to ``limit`` more events already waiting, without waiting (batching writes), and
        at most ``max_bytes`` of event bodies (0: no byte limit): a batch must stay under the
        transport's message size, or writing it would fail the subscriber."""
        taken: list[OutEvent] = []
        left = max_bytes
        while len(taken) < limit and not self.queue.empty():
            item = self.queue.peek()  # stop at the first message that is not an event
            if not isinstance(item, OutEvent):
                break
            if max_bytes:
                size = len(item.entry.body) + EVENT_FRAMING
                if size > left:
                    break
                left -= size
            taken.append(item)
            self.queue.get_nowait()
        self.delivered += len(taken)
        if self.queue.qsize() < self.buffer // 2 + 1:
            self._room.set()
        return taken

    # -- called by the reader (client messages) ------------------------------------------------
    async def _put(self, item: Out) -> None:
        # Replies and replayed history wait for room instead of dropping: the client asked.
        while self.queue.qsize() >= self.buffer and self.dropped is None:
            self._room.clear()
            await self._room.wait()
        self.queue.put_nowait(item)

    async def ping(self, request_id: int, nonce: int) -> None:
        await self._put(OutPong(request_id, nonce))

    async def error(self, request_id: int, code: str, message: str, field_name: str = "") -> None:
        await self._put(OutError(request_id, code, message, field_name))

    async def subscribe(self, request_id: int, requests: list[ChannelRequest]) -> None:
        """Subscribe to each channel; per-channel problems are answered with an error."""
        if not requests:
            await self.error(
                request_id, "INVALID_ARGUMENT", "subscribe.channels is empty", "channels"
            )
            return
        for i, req in enumerate(requests):
            await self._subscribe_one(request_id, req, f"channels[{i}]")

    async def _subscribe_one(self, request_id: int, req: ChannelRequest, where: str) -> None:
        problem = check_subscribable(req.channel, self.principal.roles, self.principal.tenant)
        if problem is not None:
            await self.error(request_id, problem[0], problem[1], f"{where}.channel")
            return
        if req.channel in self.subs:
            await self.error(
                request_id, "ALREADY_EXISTS", f"already subscribed to {req.channel!r}", where
            )
            return
        if len(self.subs) >= self.max_channels:
            await self.error(
                request_id,
                "RESOURCE_EXHAUSTED",
                f"at most {self.max_channels} channels per subscription stream",
                where,
            )
            return
        tenant = history_tenant(req.channel, self.principal.tenant)
        # Attach first so no live entry slips between the history read and the feed. The feed
        # knows the tenant's head and epoch: a subscribe costs no history round trip unless it
        # resumes from further back than the feed remembers (a burst of subscribes, as when a
        # replica's subscribers all move here at once, is served from memory).
        sub = Subscription(req.channel, tenant, live_from=0, replaying=True)
        self.subs[req.channel] = sub
        feed = await self.feeds.attach(tenant, self)
        sub.live_from, sub.epoch = feed.offset, feed.epoch
        if req.resume and req.epoch and not feed.epoch:
            # The feed started before the tenant had any history: its epoch is not known yet.
            sub.epoch = (await self.history.info(tenant)).epoch
        same_epoch = not req.epoch or req.epoch == sub.epoch
        if req.resume and same_epoch and req.after_offset > feed.offset:
            # The feed may trail the history by the read in flight: ask the history itself.
            info = await self.history.info(tenant)
            if req.after_offset > info.head_offset and (not req.epoch or req.epoch == info.epoch):
                self._forget(sub)
                await self.error(
                    request_id,
                    "INVALID_ARGUMENT",
                    f"{where}.after_offset {req.after_offset} is ahead of this tenant's history "
                    f"head {info.head_offset} (offsets are per tenant; was it taken from another "
                    "tenant?)",
                    f"{where}.after_offset",
                )
                return
            # The client already has everything up to its offset: the feed's next entries up
            # to there must not reach it a second time.
            sub.live_from = req.after_offset
        await self._put(OutSubscribed(request_id, req.channel, sub.epoch, sub.live_from))
        if req.resume:
            await self._replay(request_id, sub, req)
        self._finish_replay(sub)

    def _forget(self, sub: Subscription) -> None:
        """Undo the attach of a subscription that was refused."""
        self.subs.pop(sub.channel, None)
        if not any(s.tenant == sub.tenant for s in self.subs.values()):
            self.feeds.detach(sub.tenant, self)

    async def _replay(self, request_id: int, sub: Subscription, req: ChannelRequest) -> None:
        after = req.after_offset
        if not req.epoch or req.epoch == sub.epoch:
            if after >= sub.live_from:
                return  # caught up: nothing to replay
            recent = self.feeds.recent(sub.tenant, after, sub.live_from)
            if recent is not None:
                for entry in recent:
                    if matches(sub.channel, entry.channel):
                        await self._put(OutEvent(sub.channel, sub.epoch, entry))
                return
        info = await self.history.info(sub.tenant)
        epoch_changed = bool(req.epoch) and req.epoch != info.epoch
        if epoch_changed:  # info.epoch "": history lost, not yet rebuilt
            after = 0
            first = info.first_offset or info.head_offset + 1  # nothing retained: the next one
            await self._put(
                OutGap(request_id, sub.channel, info.epoch, req.after_offset, req.epoch, first,
                       "history epoch changed: the history was lost or reset")
            )  # fmt: skip
        elif info.first_offset and after + 1 < info.first_offset:
            await self._put(
                OutGap(request_id, sub.channel, info.epoch, req.after_offset, req.epoch,
                       info.first_offset, "history trimmed: it no longer reaches back that far")
            )  # fmt: skip
        cursor = after
        while cursor < sub.live_from and self.dropped is None:
            chunk = await self.history.read_after(sub.tenant, cursor, REPLAY_CHUNK)
            if not chunk:
                break
            for entry in chunk:
                if entry.offset > sub.live_from:
                    break
                if epoch_changed and entry.epoch and entry.epoch != info.epoch:
                    # Kept from before the epoch changed (a store failover): its offset is not
                    # comparable with the subscriber's; the gap above covers it.
                    continue
                if matches(sub.channel, entry.channel):
                    await self._put(OutEvent(sub.channel, info.epoch or sub.epoch, entry))
            cursor = chunk[-1].offset

    def _finish_replay(self, sub: Subscription) -> None:
        """Move live entries that arrived during the replay to the queue, then go live."""
        backlog, sub.backlog, sub.replaying = sub.backlog, [], False
        for entry in backlog:
            if self.dropped is not None:
                return
            if self.queue.qsize() >= self.buffer * 2:
                self.drop_slow()
                return
            self.queue.put_nowait(OutEvent(sub.channel, sub.epoch, entry))

    async def unsubscribe(self, request_id: int, channels: list[str]) -> None:
        if not channels:
            await self.error(
                request_id, "INVALID_ARGUMENT", "unsubscribe.channels is empty", "channels"
            )
            return
        for channel in channels:
            sub = self.subs.pop(channel, None)
            if sub is None:
                await self.error(
                    request_id, "NOT_FOUND", f"not subscribed to {channel[:64]!r}", "channels"
                )
                continue
            if not any(s.tenant == sub.tenant for s in self.subs.values()):
                self.feeds.detach(sub.tenant, self)
            await self._put(OutUnsubscribed(request_id, channel))

    def close(self) -> None:
        for tenant in {s.tenant for s in self.subs.values()}:
            self.feeds.detach(tenant, self)
        self.subs.clear()
        if self.dropped is None:
            self.dropped = Dropped("CANCELLED", "session closed")
        self._room.set()
