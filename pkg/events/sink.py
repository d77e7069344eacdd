"""The producer-side contract: a service emits events without ever blocking or failing on them."""

from __future__ import annotations

import importlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

SYSTEM_TENANT = "system"


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


class EventSink(Protocol):
    """Where a producer hands events. ``emit`` must return at once: never block, never raise."""

    def emit(self, event: Event) -> None: ...


class NullSink:
    """Drops every event: the default when no Kafka bootstrap is configured."""

    def emit(self, event: Event) -> None:
        return None


class MemorySink:
    """Keeps the last ``maxlen`` events in memory: for tests and single-instance runs."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.events: deque[Event] = deque(maxlen=maxlen)

    def emit(self, event: Event) -> None:
        self.events.append(event)


def build_sink(kafka_bootstrap: str | None, *, source: str = "") -> EventSink:
    """The event sink a service should use: Kafka when a bootstrap is configured, else nothing.

    The Kafka sink (``pkg.events.kafka``) buffers in memory and never blocks its caller.
    """
    if not kafka_bootstrap:
        return NullSink()
    # Imported lazily: aiokafka is only needed when Kafka is configured.
    kafka = importlib.import_module("pkg.events.kafka")
    sink: EventSink = kafka.KafkaSink(kafka_bootstrap, source=source)
    return sink
