"""Per-tenant ordered event history: one small interface, a memory and a Redis Streams backend.

Appends are idempotent per Kafka source position and fenced per partition: see
``History.append``. Offsets are per tenant and shared by its channels, so one sequence orders
everything a tenant sees.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from pkg.events.sink import Event
from signalman import wire

# At most this many entries per tenant and read of the tail (``History.wait_many``).
TAIL_COUNT = 1_000


@dataclass(frozen=True)
class SourcePos:
    """Where a record came from: the idempotency key of its append."""

    topic: str
    partition: int
    offset: int


# The fencing token of each source (topic, partition) of a batched append, or one for all.
Fences = int | Mapping[tuple[str, int], int]


def fence_of(fences: Fences, source: SourcePos) -> int:
    """The fencing token an append from ``source`` carries."""
    if isinstance(fences, int):
        return fences
    return fences[(source.topic, source.partition)]


@dataclass(frozen=True)
class Entry:
    """One event in a tenant's history.

    ``body`` is the event in the subscribers' wire encoding (``signalman.wire``), made once when
    it was appended: delivering it to any number of subscribers, on any replica, parses nothing.
    ``event`` decodes it, only for whoever asks (replay filters, trimming, tests).
    """

    offset: int
    channel: str
    body: bytes
    epoch: str = ""  # the history epoch it was appended in ("" if not recorded)
    # The traceparent of the span that processed it ("": untraced): delivery continues it.
    trace: str = ""

    @cached_property
    def event(self) -> Event:
        return wire.decode_body(self.body)

    @property
    def time(self) -> float:
        """The event's time, without decoding its data."""
        return wire.body_time(self.body)

    def wire_event(self, subscription: str, epoch: str) -> bytes:
        """The serialized ``signalman.v1.Event`` for a subscription to ``subscription``: made
        once per entry and subscription channel, however many sessions receive it."""
        key = (subscription, epoch)
        encoded = self._wire.get(key)
        if encoded is None:
            encoded = self._wire[key] = wire.event_bytes(subscription, self.offset, epoch,
                                                         self.body)  # fmt: skip
        return encoded

    def wire_message(self, subscription: str, epoch: str) -> bytes:
        """The serialized ``ServerMessage`` carrying this event alone (what a subscriber that
        keeps up receives): made once per entry and subscription channel, like ``wire_event``,
        so every session of the tenant writes the same bytes object."""
        key = (subscription, epoch)
        message = self._message.get(key)
        if message is None:
            message = self._message[key] = wire.event_message(self.wire_event(subscription, epoch))
        return message

    @cached_property
    def _wire(self) -> dict[tuple[str, str], bytes]:
        return {}

    @cached_property
    def _message(self) -> dict[tuple[str, str], bytes]:
        return {}


@dataclass(frozen=True)
class HistoryInfo:
    """Where a tenant's history stands: ``epoch`` changes when the history was lost."""

    epoch: str
    first_offset: int  # oldest retained (0: empty)
    head_offset: int  # newest appended (0: none)


@dataclass(frozen=True)
class AppendResult:
    """``status``: "appended", "duplicate" (already there), "fenced" (stale owner, rejected) or
    "behind" (the history lost appends of this partition the caller made: it holds the
    partition only up to ``watermark``, so nothing was appended; see ``History.append_many``)."""

    status: str
    offsets: tuple[int, ...] = ()
    epoch: str = ""
    current_fence: int = 0
    watermark: int = -1


# What the caller last appended (or found appended) of each source partition, for
# ``append_many``'s loss check; -1 or absent: nothing known.
Expected = Mapping[tuple[str, int], int]


class History(Protocol):
    """What the pipeline writes to and the hub reads from."""

    async def append(
        self, tenant: str, items: list[tuple[str, Event]], source: SourcePos, fence: int
    ) -> AppendResult:
        """Append the events of one record atomically.

        Rejected ("fenced") if ``fence`` is lower than the highest fence seen for the source
        partition; skipped ("duplicate") if the source offset is at or below that partition's
        appended watermark.
        """
        ...

    async def append_many(
        self,
        records: list[tuple[str, list[tuple[str, Event]], SourcePos]],
        fence: Fences,
        expect: Expected | None = None,
    ) -> list[AppendResult]:
        """``append`` for several records (tenant, items, source) in order, in one round trip;
        each with its source partition's fence (``fence_of``).

        ``expect``: per source partition, the offset the caller last appended. A history that
        holds the partition below it (``0 <= watermark < expect``: a store failover lost the
        last appends) appends nothing of that partition and answers "behind" with its
        watermark, so the caller re-reads from there instead of leaving a hole (appending later
        records would move the watermark past the lost ones). A history without a watermark
        (reset, empty) is not "behind": what it lost is reported to subscribers as a new epoch.
        """
        ...

    async def claim(self, topic: str, partition: int, fence: int) -> int:
        """Raise the partition's fence to ``fence`` before the new owner processes anything, so a
        stale owner's next append is rejected even if nothing new arrives; returns the fence."""
        ...

    async def info(self, tenant: str) -> HistoryInfo: ...

    async def info_many(self, tenants: Sequence[str]) -> list[HistoryInfo]:
        """``info`` of each tenant, in order: one round trip where the store has them (a
        replica's tail checks every quiet tenant's epoch each second)."""
        ...

    async def read_after(self, tenant: str, after: int, limit: int) -> list[Entry]:
        """Entries with offset > ``after``, oldest first, at most ``limit``."""
        ...

    async def wait_many(self, after: Mapping[str, int], wait_s: float) -> dict[str, list[Entry]]:
        """The entries after ``after[tenant]`` of each tenant that has some (oldest first, up to
        ``TAIL_COUNT`` each), waiting up to ``wait_s`` seconds for any: one read serves every
        tenant a replica tails (``{}`` if nothing arrived)."""
        ...

    async def trim(self, tenant: str, max_len: int, min_time: float) -> int:
        """Drop entries beyond ``max_len`` or older than ``min_time`` (unix s); returns dropped."""
        ...

    async def tenants(self) -> list[str]: ...

    async def watermark(self, topic: str, partition: int) -> int:
        """Highest source offset appended for a partition (-1: none)."""
        ...

    async def close(self) -> None: ...


def load_event(raw: str | bytes, data: dict[str, Any] | None = None) -> Event:
    """An event stored by an older version (its fields as JSON, ``data`` kept apart): such
    entries stay readable through a rolling upgrade. Validated on the way in, so trusted here."""
    obj: Any = json.loads(raw)
    return Event(
        type=obj["type"],
        tenant=obj["tenant"],
        data=obj["data"] if data is None else data,
        id=obj["id"],
        time=obj["time"],
        schema_version=obj["schema_version"],
        source=obj["source"],
    )
