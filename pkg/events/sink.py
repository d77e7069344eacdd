"""The producer-side contract: a service emits events without ever blocking or failing on them."""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from pkg.common.tenant import SYSTEM_TENANT

__all__ = [
    "SYSTEM_TENANT",
    "Event",
    "EventSink",
    "ManagedSink",
    "MemorySink",
    "NullSink",
    "SinkState",
]


@dataclass(frozen=True)
class Event:
    """One platform event. ``tenant`` is the partitioning key; infrastructure events use
    ``SYSTEM_TENANT`` and reach SYSTEM subscribers only."""

    type: str  # e.g. "node.registered", "stream.started", "routing.decision"
    tenant: str
    data: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = field(default_factory=time.time)
    schema_version: int = 1
    source: str = ""
    # W3C traceparent of the span that published it ("": untraced). It travels in the Kafka
    # record's headers and the history entry, never in the envelope or to subscribers, and is
    # not part of an event's identity.
    trace: str = field(default="", compare=False)


class EventSink(Protocol):
    """Where a producer hands events. ``emit`` must return at once: never block, never raise."""

    def emit(self, event: Event) -> None: ...


@dataclass(frozen=True)
class SinkState:
    """What a sink reports for its owner's health: ``connected`` false means events wait in a
    bounded buffer (``reason`` says why), dropped ones are counted."""

    kind: str  # "none", "memory", "kafka", "signalman"
    connected: bool = True
    buffered: int = 0
    dropped: int = 0
    sent: int = 0
    reason: str = ""


class ManagedSink(EventSink, Protocol):
    """A sink its owner starts, watches and closes (every sink in this package is one)."""

    def state(self) -> SinkState: ...

    async def aclose(self) -> None:
        """Send what is buffered (bounded wait), then stop."""


class NullSink:
    """Drops every event: the default when no event transport is configured."""

    def emit(self, event: Event) -> None:
        return None

    def state(self) -> SinkState:
        return SinkState("none")

    async def aclose(self) -> None:
        return None


class MemorySink:
    """Keeps the last ``maxlen`` events in memory: for tests and single-instance runs."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.events: deque[Event] = deque(maxlen=maxlen)

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def state(self) -> SinkState:
        return SinkState("memory", sent=len(self.events))

    async def aclose(self) -> None:
        return None
