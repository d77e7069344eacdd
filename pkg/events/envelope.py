"""The versioned JSON envelope of platform events on Kafka: encode, decode and validate.

One record holds one event ``{"v": 1, "id", "type", "tenant", "time", "schema_version", "source",
"data"}`` or a batch ``{"v": 1, "batch": [event, ...]}`` of one tenant. Decoding is strict and
says exactly what is wrong, because a consumer dead-letters what it cannot read with that reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pkg.common.tenant import TENANT_ID_RE
from pkg.events.sink import Event

ENVELOPE_VERSION = 1
# Highest event schema version this code understands; a newer one is retryable (rolling upgrade).
MAX_SCHEMA_VERSION = 1
MAX_BATCH = 1_000

# The platform's one tenant-id syntax (pkg.common.tenant).
_TENANT_RE = TENANT_ID_RE
_TYPE_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
# Tenants and event types repeat on every record: once one has passed its regex it is found in a
# set (a regex match per field and event was a tenth of decoding one). Bounded: past the cap,
# new names are still checked, just not remembered.
_KNOWN_CAP = 10_000
_known_tenants: set[str] = set()
_known_types: set[str] = set()


def _valid(value: str, pattern: re.Pattern[str], known: set[str]) -> bool:
    if value in known:
        return True
    if pattern.fullmatch(value) is None:
        return False
    if len(known) < _KNOWN_CAP:
        known.add(value)
    return True


class EnvelopeError(ValueError):
    """A record is not a valid envelope; ``retryable`` when a newer consumer could read it."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def event_to_dict(event: Event) -> dict[str, Any]:
    """The JSON object of one event (without the envelope version)."""
    return {
        "id": event.id,
        "type": event.type,
        "tenant": event.tenant,
        "time": event.time,
        "schema_version": event.schema_version,
        "source": event.source,
        "data": event.data,
    }


# One encoder for every record (json.dumps with options builds a new encoder on each call).
_encode = json.JSONEncoder(default=str).encode


def encode_event(event: Event) -> bytes:
    """One event as a record value."""
    return _encode({"v": ENVELOPE_VERSION, "id": event.id, "type": event.type,
                    "tenant": event.tenant, "time": event.time,
                    "schema_version": event.schema_version, "source": event.source,
                    "data": event.data}).encode()  # fmt: skip


def encode_batch(events: Iterable[Event]) -> bytes:
    """Several events of one tenant as one record value."""
    items = [event_to_dict(e) for e in events]
    return json.dumps({"v": ENVELOPE_VERSION, "batch": items}, default=str).encode()


def valid_tenant(tenant: str) -> bool:
    """Tenant ids have the platform's one syntax (``pkg.common.tenant``): they become Kafka
    keys, Redis key parts and cache-key parts."""
    return _valid(tenant, _TENANT_RE, _known_tenants)


def event_from_dict(obj: Any, where: str = "event") -> Event:
    """Validate one event object; raises ``EnvelopeError`` naming the bad field."""
    # type() first: what json.loads returns is a dict, and an ABC isinstance check is slow.
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise EnvelopeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    tenant = obj.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise EnvelopeError(f"{where}.tenant: missing")
    if not valid_tenant(tenant):
        raise EnvelopeError(f"{where}.tenant: {tenant[:40]!r} is not a valid tenant id")
    etype = obj.get("type")
    if not isinstance(etype, str) or not _valid(etype, _TYPE_RE, _known_types):
        raise EnvelopeError(f"{where}.type: {str(etype)[:40]!r} is not a dotted event type")
    eid = obj.get("id")
    if not isinstance(eid, str) or not eid or len(eid) > 128:
        raise EnvelopeError(f"{where}.id: missing or not a string of at most 128 characters")
    version = obj.get("schema_version", 1)
    if type(version) is not int or version < 1:  # (not a bool either)
        raise EnvelopeError(f"{where}.schema_version: expected a positive integer")
    if version > MAX_SCHEMA_VERSION:
        raise EnvelopeError(
            f"{where}.schema_version: {version} is newer than supported {MAX_SCHEMA_VERSION}",
            retryable=True,
        )
    when = obj.get("time", 0.0)
    if type(when) is not float and type(when) is not int:  # (not a bool either)
        raise EnvelopeError(f"{where}.time: expected a number (unix seconds)")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise EnvelopeError(f"{where}.data: expected a JSON object")
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise EnvelopeError(f"{where}.source: expected a string")
    return Event(
        type=etype,
        tenant=tenant,
        data=data,
        id=eid,
        time=float(when),
        schema_version=version,
        source=source,
    )


def decode_record(value: bytes | None, key: bytes | None = None) -> list[Event]:
    """Decode a record into its events (one, or a batch of one tenant).

    Raises ``EnvelopeError`` with the reason when the record is garbage, the wrong schema, or a
    batch mixes tenants or disagrees with the record key.
    """
    if value is None:
        raise EnvelopeError("record has no value")
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(f"envelope: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version != ENVELOPE_VERSION:  # (true == 1 in Python)
        raise EnvelopeError(
            f"envelope.v: {version!r} is not a supported envelope version",
            retryable=isinstance(version, int) and version > ENVELOPE_VERSION,
        )
    if "batch" in obj:
        batch = obj["batch"]
        if not isinstance(batch, list) or not batch:
            raise EnvelopeError("envelope.batch: expected a non-empty list")
        if len(batch) > MAX_BATCH:
            raise EnvelopeError(f"envelope.batch: {len(batch)} events exceed {MAX_BATCH}")
        events = [event_from_dict(item, f"batch[{i}]") for i, item in enumerate(batch)]
    else:
        events = [event_from_dict(obj)]
    tenants = {e.tenant for e in events} if len(events) > 1 else ()
    if len(tenants) > 1:
        raise EnvelopeError(f"envelope.batch: mixes tenants {sorted(tenants)[:3]}")
    if key is not None and key.decode(errors="replace") != events[0].tenant:
        raise EnvelopeError("record key does not match the event tenant")
    return events
