"""Domain messages of a session -> ``signalman.v1`` protobuf messages, and back for requests."""

from __future__ import annotations

from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman import wire
from signalman.session import (
    ChannelRequest,
    Dropped,
    Out,
    OutError,
    OutEvent,
    OutGap,
    OutPong,
    OutSubscribed,
    OutUnsubscribed,
)

STATUS_NUMBERS = {
    "OK": 0,
    "CANCELLED": 1,
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}


def events_message(events: list[OutEvent]) -> bytes:
    """A serialized ``ServerMessage`` with one event, or an ``EventBatch`` of several (the common
    case under load), spliced from the bytes the history stores: nothing is parsed or built per
    event (see ``signalman.wire``)."""
    if len(events) == 1:
        return events[0].entry.wire_message(events[0].subscription, events[0].epoch)
    return wire.batch_message([e.entry.wire_event(e.subscription, e.epoch) for e in events])


def to_proto(out: Out) -> pb.ServerMessage:
    """One outgoing session message as a ``ServerMessage``."""
    if isinstance(out, OutEvent):
        return pb.ServerMessage.FromString(events_message([out]))
    if isinstance(out, OutSubscribed):
        return pb.ServerMessage(
            request_id=out.request_id,
            subscribed=pb.Subscribed(
                channel=out.channel, epoch=out.epoch, head_offset=out.head_offset
            ),
        )
    if isinstance(out, OutUnsubscribed):
        return pb.ServerMessage(
            request_id=out.request_id, unsubscribed=pb.Unsubscribed(channel=out.channel)
        )
    if isinstance(out, OutPong):
        return pb.ServerMessage(request_id=out.request_id, pong=pb.Pong(nonce=out.nonce))
    if isinstance(out, OutError):
        return pb.ServerMessage(
            request_id=out.request_id,
            error=pb.Error(
                code=STATUS_NUMBERS.get(out.code, 2), message=out.message, field=out.field
            ),
        )
    if isinstance(out, OutGap):
        return pb.ServerMessage(
            request_id=out.request_id,
            gap=pb.HistoryGap(
                channel=out.channel,
                epoch=out.epoch,
                requested_after=out.requested_after,
                requested_epoch=out.requested_epoch,
                resumed_from=out.resumed_from,
                reason=out.reason,
            ),
        )
    if isinstance(out, Dropped):  # pragma: no cover - the handler ends the call instead
        raise TypeError("Dropped ends the call; it is not a message")
    raise TypeError(f"unknown session message {out!r}")


def channel_requests(msg: pb.SubscribeRequest) -> list[ChannelRequest]:
    return [ChannelRequest(c.channel, c.resume, c.after_offset, c.epoch) for c in msg.channels]
