"""Typed Signalman client: subscribe to channels, reconnect on its own and resume where it was.

    client = SignalmanClient(["127.0.0.1:18070", "127.0.0.1:18071"], token="tok")
    async with client.subscribe(["streams", "routing"]) as sub:
        async for item in sub:
            if isinstance(item, Gap): ...      # history did not reach back: events were lost
            else: handle(item)                 # a signalman_pb2.Event

The subscription remembers the last (epoch, offset) it delivered per channel. When its stream
ends for a reason worth retrying (replica died or shut down, subscriber dropped as too slow,
network blip) it reconnects with exponential backoff and jitter, to any listed replica, and
resubscribes with those offsets: the server replays what was missed, or sends an explicit gap.
Across a history store failover (the gap's epoch changed) the server delivers at least once: an
event appended on the old primary but not yet replicated is appended again on the new one, so
a subscriber that got it before the failover gets it again with the same id. The subscription
remembers the ids of the last ``dedupe_window`` events per channel and drops such a repeat
(counted in ``stats.duplicates_skipped``). Errors that a retry cannot fix (bad token, unknown
channel, permission) are raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from pkg.clients import Backoff, OutlierPolicy, Policy, RetryPolicy, aio_channel
from pkg.clients.discovery import dynamic_targets
from pkg.clients.log import get_logger
from pkg.clients.policy import PLATFORM_KEEPALIVE
from pkg.clients.targets import TargetList
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from pkg.proto.signalman.v1 import signalman_pb2_grpc as pb_grpc

log = get_logger("pkg.clients.signalman")

# Stream endings worth a reconnect: the replica went away, shut down, or dropped us as too slow.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    }
)


# Ids remembered per channel to drop a repeat after a store failover: the repeats are what the old
# primary had not replicated yet (replication lag: milliseconds of events, far fewer than this;
# about 60 KB per channel).
DEDUPE_WINDOW = 512


class StreamEnded(Exception):
    """The stream ended without a status worth raising: reconnect and resume."""


class SubscriptionError(Exception):
    """The server refused the subscription in a way a reconnect cannot fix."""

    def __init__(self, code: grpc.StatusCode | int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Gap:
    """History no longer reached back to where this subscription was: events were lost."""

    channel: str
    epoch: str
    requested_after: int
    resumed_from: int
    reason: str


@dataclass
class Position:
    """Where a channel's subscription is: the last delivered offset in ``epoch``."""

    epoch: str = ""
    offset: int = 0
    started: bool = False  # False until a subscribe succeeded: start from the live tail
    # Ids of the last events delivered, oldest first (a dict keeps insertion order), to drop a
    # repeat after a store failover.
    recent: dict[str, None] = field(default_factory=dict)

    def seen(self, event_id: str, window: int) -> bool:
        """Whether ``event_id`` was among the last ``window`` delivered; remembers it if not."""
        if not event_id or window <= 0:
            return False
        if event_id in self.recent:
            return True
        self.recent[event_id] = None
        if len(self.recent) > window:
            del self.recent[next(iter(self.recent))]
        return False


@dataclass
class SubscriptionStats:
    connects: int = 0
    reconnects: int = 0
    events: int = 0
    gaps: int = 0
    duplicates_skipped: int = 0
    last_error: str = ""
    replicas: list[str] = field(default_factory=list)


class Subscription:
    """An auto-reconnecting subscription; iterate it for ``pb.Event`` and ``Gap`` items."""

    def __init__(
        self,
        client: SignalmanClient,
        channels: Sequence[str],
        *,
        resume_from: dict[str, tuple[str, int]] | None = None,
        buffer: int = 1_000,
        dedupe_window: int = DEDUPE_WINDOW,
    ) -> None:
        if not channels:
            raise ValueError("channels must not be empty")
        if dedupe_window < 0:
            raise ValueError(f"dedupe_window must be >= 0, got {dedupe_window}")
        self.dedupe_window = dedupe_window
        self.client = client
        self.channels = list(channels)
        self.positions = {c: Position() for c in self.channels}
        for channel, (epoch, offset) in (resume_from or {}).items():
            self.positions[channel] = Position(epoch, offset, started=True)
        self.stats = SubscriptionStats()
        self._queue: asyncio.Queue[pb.Event | Gap | BaseException] = asyncio.Queue(buffer)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._ids = itertools.count(1)
        self._target_index = 0

    async def __aenter__(self) -> Subscription:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="signalman-subscription")

    async def wait_subscribed(self, wait_s: float = 10.0) -> None:
        """Wait until every channel is confirmed on the current connection."""
        await asyncio.wait_for(self._subscribed.wait(), wait_s)

    def __aiter__(self) -> AsyncIterator[pb.Event | Gap]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[pb.Event | Gap]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def get(self, wait_s: float | None = None) -> pb.Event | Gap:
        """The next event or gap (raises ``TimeoutError`` after ``wait_s`` seconds)."""
        item = await asyncio.wait_for(self._queue.get(), wait_s)
        if isinstance(item, BaseException):
            raise item
        return item

    def _requests(self) -> pb.SubscribeRequest:
        subs = []
        for channel in self.channels:
            pos = self.positions[channel]
            subs.append(
                pb.ChannelSubscription(
                    channel=channel,
                    resume=pos.started,
                    after_offset=pos.offset,
                    epoch=pos.epoch,
                )
            )
        return pb.SubscribeRequest(channels=subs)

    async def _run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0, clock=self.client.clock)
        while True:
            try:
                await self._one_connection(backoff)
                return
            except asyncio.CancelledError:
                raise
            except SubscriptionError as exc:
                await self._queue.put(exc)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RECONNECT_CODES:
                    await self._queue.put(SubscriptionError(exc.code(), exc.details() or ""))
                    return
                self.stats.last_error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # transport surprises: reconnect as well
                self.stats.last_error = repr(exc)[:200]
            self._subscribed.clear()
            self.stats.reconnects += 1
            self.client.replica_failed()
            log.info("signalman_reconnecting", error=self.stats.last_error)
            await backoff.wait()

    async def _one_connection(self, backoff: Backoff) -> None:
        # A stream sticks to one replica; after a failure the next one in the list is tried, so a
        # dead replica costs one reconnect, not a retry storm against it.
        target = self.client.replica(self._target_index)
        self._target_index += 1
        self.stats.replicas.append(target)
        stub = pb_grpc.SignalmanStub(self.client.channel(target))
        outgoing: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
        request_id = next(self._ids)
        await outgoing.put(pb.ClientMessage(request_id=request_id, subscribe=self._requests()))

        async def requests() -> AsyncIterator[pb.ClientMessage]:
            while True:
                msg = await outgoing.get()
                if msg is None:
                    return
                yield msg

        call = stub.Subscribe(requests())
        self.stats.connects += 1
        confirmed: set[str] = set()
        try:
            async for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "event":
                    await self._deliver(msg.event)
                elif kind == "batch":
                    for event in msg.batch.events:
                        await self._deliver(event)
                elif kind == "subscribed":
                    pos = self.positions[msg.subscribed.channel]
                    if not pos.started:
                        # Fresh subscription: start at the head the server reported.
                        pos.epoch, pos.offset = msg.subscribed.epoch, msg.subscribed.head_offset
                        pos.started = True
                    confirmed.add(msg.subscribed.channel)
                    if confirmed >= set(self.channels):
                        self._subscribed.set()
                        backoff.reset()
                elif kind == "gap":
                    await self._gap(msg.gap)
                elif kind == "error":
                    raise SubscriptionError(msg.error.code, msg.error.message)
        finally:
            await outgoing.put(None)
            call.cancel()
        raise StreamEnded("the server ended the subscription stream")

    async def _deliver(self, event: pb.Event) -> None:
        pos = self.positions.get(event.channel)
        if pos is None:
            return
        if pos.epoch == event.epoch and event.offset <= pos.offset and pos.started:
            self.stats.duplicates_skipped += 1  # an offset already delivered in this epoch
            return
        if pos.seen(event.id, self.dedupe_window):
            # Delivered before a store failover and appended again on the new primary: the
            # position moves on (its offset is new), the application does not see it twice.
            pos.epoch, pos.offset = event.epoch, event.offset
            self.stats.duplicates_skipped += 1
            return
        pos.epoch, pos.offset, pos.started = event.epoch, event.offset, True
        self.stats.events += 1
        await self._queue.put(event)

    async def _gap(self, gap: pb.HistoryGap) -> None:
        pos = self.positions.get(gap.channel)
        if pos is not None:
            pos.epoch, pos.offset = gap.epoch, max(0, gap.resumed_from - 1)
        self.stats.gaps += 1
        await self._queue.put(
            Gap(gap.channel, gap.epoch, gap.requested_after, gap.resumed_from, gap.reason)
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# GetStats reads counters from memory: an attempt silent for a second is on a hung replica
# and is retried on another. Publish is not idempotent and keeps the whole deadline; the
# Subscribe stream's setup is governed by ``Policy.stream_setup``.
ATTEMPT_TIMEOUTS: tuple[tuple[str, float], ...] = (("/signalman.v1.Signalman/GetStats", 1.0),)


# No BDP probing on a subscriber's connection. grpc's client pings the server to estimate the
# bandwidth-delay product whenever data arrives and its last probe is old enough; on a
# subscription, which gets a small event now and then, nearly every delivery then costs the
# replica a ping to read and acknowledge: 1.98 sendmsg and 1.99 recvmsg per delivery instead of
# 1.0 and 0.02, 4.7 context switches instead of 2.8 (3,000 subscribers on their own
# connections, 0.5 events/s each; 02:16 UTC). The estimate only sizes flow-control windows for
# bulk transfers, which event streams never are.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.http2.bdp_probe", 0),)


def default_policy(timeout_s: float = 5.0) -> Policy:
    """The policy of a Signalman client: short GetStats attempts, outlier ejection on."""
    return Policy(
        timeout=timeout_s,
        retry=RetryPolicy(attempt_timeouts=ATTEMPT_TIMEOUTS),
        outlier=OutlierPolicy(enabled=True),
        # Our servers permit frequent pings: a subscription to a silent replica ends in 30 s.
        keepalive=PLATFORM_KEEPALIVE,
    )


class SignalmanClient:
    """Calls to Signalman replicas through ``pkg.clients`` (deadlines, breaker, failover)."""

    def __init__(
        self,
        targets: str | Sequence[str] | TargetList,
        *,
        token: str | None,
        policy: Policy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``credentials``: TLS to the replicas (``pkg.common.tls.client_credentials``); None:
        plaintext."""
        self.targets = targets
        # "dns:///name:port", "file:/path" or a TargetList: replicas join and leave at runtime.
        self.target_list = dynamic_targets(targets)
        self.credentials = credentials
        self.token = token
        self.policy = policy or default_policy()
        self.clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._following = False  # holds the changing list's refresh (see replica())

    @property
    def replicas(self) -> list[str]:
        """The replica addresses, in preference order (the current ones of a changing set)."""
        if self.target_list is not None:
            return list(self.target_list.addresses)
        if isinstance(self.targets, str):
            return [t.strip() for t in self.targets.split(",") if t.strip()]
        assert not isinstance(self.targets, TargetList)  # a TargetList is target_list
        return list(self.targets)

    def replica(self, index: int) -> str:
        """The ``index``-th replica (modulo), for a subscription stream that sticks to one."""
        if self.target_list is not None:
            # A stream's channel is built on one address, not on the list, so nothing else
            # keeps a file or DNS list refreshed: without this a subscription never saw a
            # replica added or removed (it reconnected to a retired one forever).
            if not self._following:
                self.target_list.acquire()
                self._following = True
            self.target_list.start()  # no-op when refreshing already, or outside a loop
        replicas = self.replicas
        if not replicas and self.target_list is not None:
            return self.target_list.name  # none known yet: the whole (changing) set
        return replicas[index % len(replicas)]

    def channel(self, target: str | None = None) -> grpc.aio.Channel:
        """The channel to all replicas (round robin), or to the one ``target`` replica."""
        key = target or ""
        channel = self._channels.get(key)
        if channel is None:
            channel = aio_channel(
                target or self.target_list or self.targets,
                self.policy,
                token=self.token or None,
                options=CHANNEL_OPTIONS,
                credentials=self.credentials,
            )
            self._channels[key] = channel
        return channel

    def subscribe(
        self,
        channels: Sequence[str],
        *,
        resume_from: dict[str, tuple[str, int]] | None = None,
        buffer: int = 1_000,
        dedupe_window: int = DEDUPE_WINDOW,
    ) -> Subscription:
        """A subscription (use ``async with``); ``resume_from`` maps channel -> (epoch, offset);
        ``dedupe_window``: event ids remembered per channel to drop a repeat (0: none)."""
        return Subscription(
            self, channels, resume_from=resume_from, buffer=buffer, dedupe_window=dedupe_window
        )

    async def stats(self, deadline_s: float = 5.0) -> pb.HubStats:
        """Hub statistics of whichever replica answers."""
        stub: Any = pb_grpc.SignalmanStub(self.channel())
        result: pb.HubStats = await stub.GetStats(pb.GetStatsRequest(), timeout=deadline_s)
        return result

    async def publish(self, events_json: Sequence[str], deadline_s: float = 5.0) -> list[int]:
        """Embedded mode: inject events; returns their history offsets."""
        stub: Any = pb_grpc.SignalmanStub(self.channel())
        request = pb.PublishRequest(events_json=list(events_json))
        reply = await stub.Publish(request, timeout=deadline_s)
        return list(reply.offsets)

    def replica_failed(self) -> None:
        """A subscription stream to one replica failed: re-read a changing list soon."""
        if self.target_list is not None:
            self.target_list.refresh_soon()

    async def close(self) -> None:
        if self._following and self.target_list is not None:
            self.target_list.release()
            self._following = False
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
