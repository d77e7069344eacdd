"""The event pipeline (pure): one Kafka record in, entries to append or one poison verdict out.

decode -> validate -> expand batches -> classify channel -> redact. Nothing here does I/O, so the
same code runs behind Kafka, behind the embedded Publish RPC and in unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkg.events.envelope import EnvelopeError, decode_record
from pkg.events.sink import Event
from signalman.channels import UnknownEventType, classify
from signalman.redact import needs_redaction, redact


@dataclass(frozen=True)
class Processed:
    """The events of one record, ready to append to ``tenant``'s history in this order."""

    tenant: str
    items: list[tuple[str, Event]]  # (channel, redacted event)


@dataclass(frozen=True)
class Poison:
    """A record that cannot be processed: it goes to the dead-letter topic with ``reason``."""

    reason: str
    retryable: bool = False


def process_events(events: list[Event]) -> Processed | Poison:
    """Classify and redact already-decoded events of one tenant."""
    items: list[tuple[str, Event]] = []
    try:
        for event in events:
            channel = classify(event.type, event.tenant)
            # Most events carry nothing to redact: passed on as decoded, not copied.
            clean = event
            if needs_redaction(event.data):
                clean = Event(event.type, event.tenant, redact(event.data), event.id, event.time,
                              event.schema_version, event.source)  # fmt: skip
            items.append((channel, clean))
    except UnknownEventType as exc:
        return Poison(str(exc))
    return Processed(tenant=events[0].tenant, items=items)


def process_record(value: bytes | None, key: bytes | None = None) -> Processed | Poison:
    """Run one record through the whole pipeline."""
    try:
        events = decode_record(value, key)
    except EnvelopeError as exc:
        return Poison(exc.reason, retryable=exc.retryable)
    return process_events(events)
