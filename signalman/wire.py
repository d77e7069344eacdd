"""An event's subscriber-side bytes: encoded once when appended, spliced per subscriber.

Every event of a tenant reaches every subscriber of that tenant on every replica. Decoding it from
the history and building a ``signalman.v1.Event`` per subscriber cost more CPU per event than
processing it did, so the history stores the event already in the wire API's encoding, and the
tail and the writers only pass bytes along.

Protobuf allows this exactly: a message is the concatenation of its fields, in any order, and
``Event`` fields 4-10 (id, type, tenant, time, schema version, source, data) belong to the event
while fields 1-3 (channel, offset, epoch) depend on the subscription and on the history. So
``body`` (fields 4-10) is encoded once by protobuf itself, and a subscriber's ``Event`` is a short
head of fields 1-3 followed by it: the same bytes ``SerializeToString`` produces (fields in
number order), which ``tests/signalman/test_wire.py`` checks. ``ServerMessage`` carries one such
event (field ``event``) or several (field ``batch``, an ``EventBatch``) in the same way.

No I/O here: the history encodes with it, the wire layer frames with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pkg.events.sink import Event
from pkg.proto.signalman.v1 import signalman_pb2 as pb

# One encoder for every event's data (json.dumps with options builds a new encoder on each
# call). Event data comes from json.loads, so it has no cycles to check for.
_encode_json = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False).encode

_VARINT, _LEN = 0, 2


def _tag(message: type, field: str, wire_type: int) -> bytes:
    # Taken from the generated descriptors, so a renumbered field cannot go unnoticed.
    number = message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]
    return varint(number << 3 | wire_type)


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]
_CHANNEL = _tag(pb.Event, "channel", _LEN)
_OFFSET = _tag(pb.Event, "offset", _VARINT)
_EPOCH = _tag(pb.Event, "epoch", _LEN)
_MESSAGE_EVENT = _tag(pb.ServerMessage, "event", _LEN)
_MESSAGE_BATCH = _tag(pb.ServerMessage, "batch", _LEN)
_BATCH_EVENTS = _tag(pb.EventBatch, "events", _LEN)


def encode_data(data: object) -> str:
    """An event's data as the JSON text subscribers receive (``Event.data_json``)."""
    return _encode_json(data)


def encode_body(event: Event) -> bytes:
    """Fields 4-10 of ``signalman.v1.Event``: everything but channel, offset and epoch."""
    return pb.Event(
        id=event.id,
        type=event.type,
        tenant=event.tenant,
        time=event.time,
        schema_version=event.schema_version,
        source=event.source,
        data_json=encode_data(event.data),
    ).SerializeToString()


def decode_body(body: bytes) -> Event:
    """The event a body was encoded from (its data through JSON, as subscribers see it)."""
    msg = pb.Event.FromString(body)
    return Event(
        type=msg.type,
        tenant=msg.tenant,
        data=json.loads(msg.data_json) if msg.data_json else {},
        id=msg.id,
        time=msg.time,
        schema_version=msg.schema_version,
        source=msg.source,
    )


def body_time(body: bytes) -> float:
    """The event time of a body (history trimming by age)."""
    return float(pb.Event.FromString(body).time)


def _len_field(tag: bytes, value: bytes) -> bytes:
    return tag + varint(len(value)) + value


def event_bytes(channel: str, offset: int, epoch: str, body: bytes) -> bytes:
    """A serialized ``signalman.v1.Event``: the subscription's head, then the stored body.

    Proto3 leaves out fields at their default (empty epoch, offset 0), and so does this.
    """
    head = _len_field(_CHANNEL, channel.encode()) if channel else b""
    if offset:
        head += _OFFSET + varint(offset)
    if epoch:
        head += _len_field(_EPOCH, epoch.encode())
    return head + body


def event_message(event: bytes) -> bytes:
    """A serialized ``ServerMessage`` carrying one serialized ``Event``."""
    return _len_field(_MESSAGE_EVENT, event)


def batch_message(events: Sequence[bytes]) -> bytes:
    """A serialized ``ServerMessage`` carrying an ``EventBatch`` of serialized events."""
    batch = b"".join([_BATCH_EVENTS + varint(len(e)) + e for e in events])
    return _len_field(_MESSAGE_BATCH, batch)
