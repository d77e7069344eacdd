"""The event pipeline (pure): one Kafka record in, entries to append or one poison verdict out.

decode -> validate -> expand batches -> classify channel -> redact. Nothing here does I/O, so the
same code runs behind Kafka, behind the embedded Publish RPC and in unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkg.events.envelope import EnvelopeError, decode_record
from pkg.events.sink import Event
from signalman import wire
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


def oversized(processed: Processed, max_event_bytes: int) -> Poison | None:
    """The verdict for a record holding an event no subscriber message can carry (its wire
    encoding is over ``max_event_bytes``): delivering it would fail every subscriber of the
    tenant, on every retry, so the record goes to the dead-letter topic instead."""
    for _, event in processed.items:
        size = len(wire.encode_body(event))
        if size > max_event_bytes:
            return Poison(
                f"event {event.id[:64]!r}: {size} bytes encoded, more than a subscriber "
                f"message carries ({max_event_bytes})"
            )
    return None


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


def process_record(
    value: bytes | None, key: bytes | None = None, max_event_bytes: int = 0
) -> Processed | Poison:
    """Run one record through the whole pipeline. ``max_event_bytes`` (0: no limit): events
    larger than that once encoded are poison (``oversized``); only records larger than it pay
    for the check."""
    try:
        events = decode_record(value, key)
    except EnvelopeError as exc:
        return Poison(exc.reason, retryable=exc.retryable)
    result = process_events(events)
    big = max_event_bytes and value is not None and len(value) > max_event_bytes
    if big and isinstance(result, Processed):
        return oversized(result, max_event_bytes) or result
    return result
