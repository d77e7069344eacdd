"""Events are delivered as bytes spliced from the history (``signalman.wire``): those bytes must
be exactly what protobuf itself would send, so every client reads them as before."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from api_realtime.convert import events_message, to_proto
from pkg.events import Event
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman import wire
from signalman.history import Entry
from signalman.session import OutEvent

_text = st.text(max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_events = st.builds(
    Event,
    type=_text,
    tenant=_text,
    data=st.dictionaries(_text, _json, max_size=5),
    id=_text,
    time=st.floats(allow_nan=False, allow_infinity=False),
    schema_version=st.integers(0, 2**31 - 1),
    source=_text,
)


def expected_event(channel: str, offset: int, epoch: str, event: Event) -> pb.Event:
    return pb.Event(
        channel=channel, offset=offset, epoch=epoch, id=event.id, type=event.type,
        tenant=event.tenant, time=event.time, schema_version=event.schema_version,
        source=event.source, data_json=wire.encode_data(event.data),
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_events, _text, st.integers(0, 2**64 - 1), _text)
def test_a_spliced_event_is_byte_for_byte_what_protobuf_serializes(
    event: Event, channel: str, offset: int, epoch: str
) -> None:
    spliced = wire.event_bytes(channel, offset, epoch, wire.encode_body(event))
    assert spliced == expected_event(channel, offset, epoch, event).SerializeToString()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_events, st.integers(1, 2**40)), min_size=1, max_size=6), _text)
def test_messages_of_one_or_several_events_parse_as_the_generated_messages(
    items: list[tuple[Event, int]], epoch: str
) -> None:
    outs = [OutEvent("all", epoch, Entry(offset, "nodes", wire.encode_body(event), epoch))
            for event, offset in items]  # fmt: skip
    expected = [expected_event("all", offset, epoch, event) for event, offset in items]
    message = pb.ServerMessage.FromString(events_message(outs))
    if len(items) == 1:
        assert message.WhichOneof("kind") == "event"
        assert message.event == expected[0]
        assert events_message(outs) == pb.ServerMessage(event=expected[0]).SerializeToString()
    else:
        assert message.WhichOneof("kind") == "batch"
        assert list(message.batch.events) == expected
        assert events_message(outs) == (
            pb.ServerMessage(batch=pb.EventBatch(events=expected)).SerializeToString()
        )


def test_an_entry_decodes_its_event_and_encodes_each_subscription_once() -> None:
    event = Event("stream.started", "acme", {"n": 1, "ip": "10.0.0.0/24"}, id="e1", time=12.5)
    entry = Entry(7, "streams", wire.encode_body(event), "ep")
    assert entry.event == event
    first = entry.wire_event("streams", "ep")
    assert entry.wire_event("streams", "ep") is first  # shared by every session of the replica
    assert pb.Event.FromString(entry.wire_event("all", "ep")).channel == "all"
    parsed: Any = to_proto(OutEvent("all", "ep", entry))
    assert parsed.event.offset == 7 and parsed.event.data_json == '{"n":1,"ip":"10.0.0.0/24"}'
    # What a subscriber that keeps up gets: one message per entry and channel, the same bytes
    # object for every session (encoded once per event and tenant, never per subscriber).
    alone = events_message([OutEvent("streams", "ep", entry)])
    assert events_message([OutEvent("streams", "ep", entry)]) is alone
    assert pb.ServerMessage.FromString(alone).event.SerializeToString() == first


def test_a_large_offset_and_long_fields_use_multi_byte_varints() -> None:
    event = Event("node.registered", "acme", {"blob": "x" * 70_000}, id="i" * 128, time=1.0)
    spliced = wire.event_bytes("nodes", 2**35 + 3, "e" * 200, wire.encode_body(event))
    assert spliced == expected_event("nodes", 2**35 + 3, "e" * 200, event).SerializeToString()
