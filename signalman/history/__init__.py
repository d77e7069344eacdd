"""Per-tenant ordered event history: one small interface, a memory and a Redis Streams backend.

Appends are idempotent per Kafka source position and fenced per partition: see
``History.append``. Offsets are per tenant and shared by its channels, so one sequence orders
everything a tenant sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from pkg.events.envelope import event_to_dict
from pkg.events.sink import Event


@dataclass(frozen=True)
class SourcePos:
    """Where a record came from: the idempotency key of its append."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Entry:
    """One event in a tenant's history. ``data_json`` is the event's data, encoded once and
    shared by every subscriber it is sent to."""

    offset: int
    channel: str
    event: Event
    data_json: str = ""
    epoch: str = ""  # the history epoch it was appended in ("" if not recorded)


@dataclass(frozen=True)
class HistoryInfo:
    """Where a tenant's history stands: ``epoch`` changes when the history was lost."""

    epoch: str
    first_offset: int  # oldest retained (0: empty)
    head_offset: int  # newest appended (0: none)


@dataclass(frozen=True)
class AppendResult:
    """``status``: "appended", "duplicate" (already there) or "fenced" (stale owner, rejected)."""

    status: str
    offsets: tuple[int, ...] = ()
    epoch: str = ""
    current_fence: int = 0


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
        self, records: list[tuple[str, list[tuple[str, Event]], SourcePos]], fence: int
    ) -> list[AppendResult]:
        """``append`` for several records (tenant, items, source) in order, in one round trip."""
        ...

    async def claim(self, topic: str, partition: int, fence: int) -> int:
        """Raise the partition's fence to ``fence`` before the new owner processes anything, so a
        stale owner's next append is rejected even if nothing new arrives; returns the fence."""
        ...

    async def info(self, tenant: str) -> HistoryInfo: ...

    async def read_after(self, tenant: str, after: int, limit: int) -> list[Entry]:
        """Entries with offset > ``after``, oldest first, at most ``limit``."""
        ...

    async def wait_after(self, tenant: str, after: int, wait_s: float) -> list[Entry]:
        """Like ``read_after`` but waits up to ``wait_s`` seconds for something new."""
        ...

    async def trim(self, tenant: str, max_len: int, min_time: float) -> int:
        """Drop entries beyond ``max_len`` or older than ``min_time`` (unix s); returns dropped."""
        ...

    async def tenants(self) -> list[str]: ...

    async def watermark(self, topic: str, partition: int) -> int:
        """Highest source offset appended for a partition (-1: none)."""
        ...

    async def close(self) -> None: ...


# One encoder for every dump (json.dumps with options builds a new encoder on each call). Event
# data comes from json.loads, so it has no cycles to check for.
_encode = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False).encode


def dump_event(event: Event) -> str:
    return _encode(event_to_dict(event))


def dump_meta(event: Event) -> str:
    """The event without its data (stored apart, so subscribers get ``data_json`` as stored)."""
    return _encode({**event_to_dict(event), "data": {}})


def dump_data(event: Event) -> str:
    return _encode(event.data)


def load_event(raw: str | bytes, data: dict[str, Any] | None = None) -> Event:
    """An event read back from the history: validated on the way in, so trusted here. ``data``
    replaces the stored data (entries keep their data apart from the rest of the event)."""
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
