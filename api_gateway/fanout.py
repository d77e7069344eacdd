"""One Signalman stream per tenant, shared by all of that tenant's subscriptions on this replica.

A GraphQL subscription does not open its own upstream stream: the first subscription of a tenant
opens one on every tenant channel (``all``), later ones join it, and each event goes to the
subscriptions whose channels it matches. The last subscription to leave closes the stream.
Subscriptions per tenant are capped (``max_per_tenant``): past the cap the subscription fails at
once with ``SUBSCRIPTION_LIMIT`` (``retryable: false``: waiting does not help, closing another
does). Each subscription has a bounded buffer: one that stops reading is ended with
``SLOW_SUBSCRIBER`` instead of holding the stream (and its tenant's other subscriptions) back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from api_gateway import errors
from api_gateway.backend import BackendError, EventsBackend, Json

log = structlog.get_logger("bridge.fanout")

# The channels a tenant may subscribe to through Bridge (Signalman's tenant channels).
TENANT_CHANNELS = ("nodes", "streams", "routing", "all")
ALL = "all"


# Signalman's channel of an event type (its prefix); the upstream stream is on ``all``, so each
# event arrives labelled ``all`` and Bridge puts it on the channel its type belongs to.
_CHANNEL_OF_PREFIX = {"node": "nodes", "stream": "streams", "routing": "routing"}
GAP = "history_gap"


def _delivered_as(event: Json, channels: frozenset[str]) -> str | None:
    """The channel a subscription to ``channels`` receives ``event`` on, or None if it does not
    (as a direct subscription to Signalman would label it: the channel subscribed to)."""
    event_type = str(event.get("type", ""))
    if event_type == GAP:  # history no longer reaches back: every subscription must know
        return ALL if ALL in channels else min(channels)
    channel = _CHANNEL_OF_PREFIX.get(event_type.split(".", 1)[0])
    if channel in channels:
        return channel
    return ALL if ALL in channels else None


@dataclass(eq=False)
class _Subscriber:
    channels: frozenset[str]
    queue: asyncio.Queue[Json | BackendError]
    ended: bool = False

    def offer(self, item: Json | BackendError) -> bool:
        """Queue ``item``; False when the buffer is full (the subscriber is too slow)."""
        if self.ended:
            return True
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True


@dataclass(eq=False)
class _Feed:
    tenant: str
    subscribers: set[_Subscriber] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class SharedEvents:
    """An ``EventsBackend`` that multiplexes a tenant's subscriptions over one upstream stream."""

    def __init__(self, upstream: EventsBackend, max_per_tenant: int = 100, buffer: int = 256):
        self.upstream = upstream
        self.max_per_tenant = max_per_tenant
        self.buffer = buffer
        self._feeds: dict[str, _Feed] = {}

    def upstream_streams(self) -> int:
        """Open upstream streams (one per tenant with subscribers): for /health and tests."""
        return sum(1 for f in self._feeds.values() if f.task is not None and not f.task.done())

    def subscriptions(self, tenant: str) -> int:
        feed = self._feeds.get(tenant)
        return len(feed.subscribers) if feed else 0

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        unknown = [c for c in channels if c not in TENANT_CHANNELS]
        if unknown:
            raise BackendError(
                errors.BAD_USER_INPUT,
                f"unknown channel {unknown[0][:64]!r}; channels: {', '.join(TENANT_CHANNELS)}",
                field="channels",
            )
        feed = self._feeds.get(tenant)
        if feed is None:
            feed = self._feeds[tenant] = _Feed(tenant)
        if len(feed.subscribers) >= self.max_per_tenant:
            raise BackendError(
                errors.SUBSCRIPTION_LIMIT,
                f"tenant {tenant!r} has {self.max_per_tenant} subscriptions open on this "
                "gateway (the cap): close one before opening another",
            )
        me = _Subscriber(frozenset(channels), asyncio.Queue(self.buffer))
        feed.subscribers.add(me)
        if feed.task is None or feed.task.done():
            feed.task = asyncio.create_task(self._pump(feed), name=f"events-{tenant}")
        try:
            while True:
                item = await me.queue.get()
                if isinstance(item, BackendError):
                    raise item
                yield item
        finally:
            me.ended = True
            feed.subscribers.discard(me)
            if not feed.subscribers:
                await self._close(feed)

    async def _close(self, feed: _Feed) -> None:
        if self._feeds.get(feed.tenant) is feed:
            del self._feeds[feed.tenant]
        task, feed.task = feed.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pump(self, feed: _Feed) -> None:
        """Read the tenant's upstream stream and hand each event to its matching subscribers."""
        failure: BackendError
        try:
            async for event in self.upstream.subscribe(feed.tenant, [ALL]):
                for sub in list(feed.subscribers):
                    channel = _delivered_as(event, sub.channels)
                    if channel is not None and not sub.offer({**event, "channel": channel}):
                        sub.ended = True
                        feed.subscribers.discard(sub)
                        sub.queue.get_nowait()  # make room for the reason it ends
                        sub.queue.put_nowait(
                            BackendError(
                                errors.SLOW_SUBSCRIBER,
                                f"this subscription fell {self.buffer} events behind and was "
                                "ended; subscribe again (with fewer channels, or read faster)",
                            )
                        )
            failure = BackendError(errors.SUBSCRIPTIONS_UNAVAILABLE, "the event stream ended")
        except asyncio.CancelledError:
            raise
        except BackendError as exc:
            failure = exc
        except Exception as exc:
            log.error("event_feed_failed", tenant=feed.tenant, error=repr(exc)[:200])
            failure = BackendError(errors.SUBSCRIPTIONS_UNAVAILABLE, "the event stream failed")
        # The upstream ended: every subscriber learns why; a new subscription opens a new one.
        if self._feeds.get(feed.tenant) is feed:
            del self._feeds[feed.tenant]
        for sub in list(feed.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                if sub.queue.full():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(failure)

    async def close(self) -> None:
        for feed in list(self._feeds.values()):
            await self._close(feed)
        await self.upstream.close()
