"""The ``signalman.v1.Signalman`` servicer: wire API -> hub, sessions and processor.

Subscribe requests are deserialized here rather than by grpc, so a garbled message gets a clear
INVALID_ARGUMENT instead of an opaque INTERNAL. The tenant always comes from the bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError

from api_realtime.access import subscription_tenant
from api_realtime.convert import channel_requests, events_message, to_proto
from pkg.common import tracing
from pkg.common.auth import current_principal
from pkg.events.envelope import EnvelopeError, event_from_dict
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman.history import SourcePos
from signalman.hub import Hub, TooManyConnections
from signalman.pipeline import Poison, Processed, oversized, process_events
from signalman.processor import Processor, age_sampled, record_age
from signalman.session import Dropped, OutEvent, Session

log = structlog.get_logger("api_realtime.handlers")
SERVICE = "signalman.v1.Signalman"
LOCAL_TOPIC = "local"
MAX_PUBLISH = 1_000
MAX_BATCH = 100  # events per EventBatch message


class SignalmanServicer:
    """Subscribe, GetStats and (embedded mode) Publish.

    Not a subclass of the generated ``SignalmanServicer``: Subscribe reads raw bytes and writes
    through the context (``add_to_server`` registers it that way), a signature the generated
    base does not allow; ``add_to_server`` serves the same three methods.
    """

    def __init__(
        self,
        hub: Hub,
        processor: Processor,
        stats: Callable[[], dict[str, Any]],
        *,
        embedded: bool,
        max_batch_bytes: int = 0,
    ) -> None:
        self.hub = hub
        self.processor = processor
        self.stats = stats  # replica-level stats (ownership, mode...)
        self.embedded = embedded
        # A batch written to a subscriber stays under the gRPC send limit (0: count only).
        self.max_batch_bytes = max_batch_bytes
        self._local_offsets: itertools.count[int] | None = None
        self._publish_lock = asyncio.Lock()

    # -- Subscribe --------------------------------------------------------------------------------
    async def Subscribe(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        principal = current_principal()
        tenant = subscription_tenant(principal)
        if tenant != principal.tenant:  # a platform credential: the SYSTEM channel only
            principal = replace(principal, tenant=tenant)
        try:
            session = self.hub.open_session(principal)
        except TooManyConnections as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        # Headers go out before the writer starts. Otherwise the first write carries them, and if
        # the session ends while that write is in flight (cancelled below), abort() sends them a
        # second time: grpc refuses the status (TOO_MANY_OPERATIONS), the call never ends, and
        # the client waits forever on a stream that will deliver nothing.
        try:
            await context.send_initial_metadata(())
        except BaseException:
            self.hub.close_session(session)
            raise
        ended = asyncio.Event()
        session.on_drop = lambda _dropped: ended.set()
        reader = asyncio.create_task(self._read(request_iterator, session))
        # The writer may block on a client that does not read (HTTP/2 flow control); the call
        # ends as soon as the session is dropped, whatever the writer is doing.
        writer = asyncio.create_task(self._write(session, context))
        writer.add_done_callback(lambda _task: ended.set())  # client gone: writes fail
        try:
            await ended.wait()
        finally:
            for task in (writer, reader):
                task.cancel()
            for task in (writer, reader):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.hub.close_session(session)
        dropped = session.dropped
        if dropped is not None and dropped.code not in ("OK", "CANCELLED"):
            await context.abort(grpc.StatusCode[dropped.code], dropped.message)

    async def _write(self, session: Session, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            out = await session.next_out()
            if isinstance(out, Dropped):
                return
            if isinstance(out, OutEvent):
                cap = self.max_batch_bytes
                room = max(1, cap - len(out.entry.body)) if cap else 0  # 1: nothing more fits
                events = [out, *session.take_events(MAX_BATCH - 1, room)]
                await context.write(events_message(events))
                sampled = [e.entry for e in events if age_sampled(e.entry.offset)]
                if sampled:
                    now = self.hub.clock.time()
                    for entry in sampled:
                        record_age(now, entry.time, "delivered")
                continue
            await context.write(to_proto(out).SerializeToString())

    async def _read(self, requests: AsyncIterator[bytes], session: Session) -> None:
        try:
            async for raw in requests:
                try:
                    msg = pb.ClientMessage.FromString(raw)
                except DecodeError:
                    session.drop(
                        "INVALID_ARGUMENT",
                        "garbled client message: not a signalman.v1.ClientMessage",
                    )
                    return
                kind = msg.WhichOneof("kind")
                if kind == "subscribe":
                    await session.subscribe(msg.request_id, channel_requests(msg.subscribe))
                elif kind == "unsubscribe":
                    await session.unsubscribe(msg.request_id, list(msg.unsubscribe.channels))
                elif kind == "ping":
                    await session.ping(msg.request_id, msg.ping.nonce)
                else:
                    await session.error(
                        msg.request_id,
                        "INVALID_ARGUMENT",
                        "client message has none of subscribe/unsubscribe/ping set",
                        "kind",
                    )
            # Half-close means "no more requests", not "stop": keep streaming (a client that
            # sends one subscribe and closes its side, as grpcurl does, still gets its events)
            # until it cancels the call or the session is dropped.
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("subscribe_reader_failed", error=repr(exc)[:200], session=session.id)
            session.drop("UNAVAILABLE", "could not read the subscription stream; reconnect")

    # -- GetStats ---------------------------------------------------------------------------------
    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HubStats:
        principal = current_principal()
        s = self.stats()
        p = self.processor.stats
        return pb.HubStats(
            replica_id=s["replica_id"],
            mode=s["mode"],
            subscribers=len(self.hub.sessions),
            subscribers_of_tenant=self.hub.per_tenant.get(principal.tenant, 0),
            partitions=[
                pb.PartitionOwnership(topic=t, partition=pt, fence=f, lag=lag)
                for (t, pt, f, lag) in s["partitions"]
            ],
            events_processed=p.records,
            events_appended=p.appended,
            duplicate_appends_skipped=p.duplicates,
            dead_lettered=p.dead_lettered,
            fenced_writes=p.fenced,
            subscribers_dropped=self.hub.dropped_total,
            singleton=s["singleton"],
            delivered=self.hub.delivered(),
        )

    # -- Publish (embedded mode) -------------------------------------------------------------------
    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishReply:
        # The access map lets only the platform's system credential call Publish: it may
        # publish for any tenant (the envelope checks each tenant id).
        if not self.embedded:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this replica consumes Kafka: publish events to the Kafka topic instead",
            )
        if not request.events_json:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "events_json is empty")
        if len(request.events_json) > MAX_PUBLISH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_PUBLISH} events per call"
            )
        events = []
        for i, raw in enumerate(request.events_json):
            try:
                event = event_from_dict(json.loads(raw), f"events_json[{i}]")
            except (ValueError, EnvelopeError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:300])
            events.append(event)
        offsets: list[int] = []
        async with self._publish_lock:  # local offsets are the idempotency keys: keep them dense
            if self._local_offsets is None:
                start = await self.processor.history.watermark(LOCAL_TOPIC, 0) + 1
                self._local_offsets = itertools.count(start)
            for i, event in enumerate(events):
                result = process_events([event])
                limit = self.processor.max_event_bytes
                if limit and len(request.events_json[i]) > limit and not isinstance(result, Poison):
                    result = oversized(result, limit) or result
                if isinstance(result, Poison):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, result.reason)
                    return pb.PublishReply()  # unreachable: abort raises
                if tracing.ENABLED:  # delivery continues the Publish call's trace
                    result = _traced(result, tracing.current_traceparent())
                source = SourcePos(LOCAL_TOPIC, 0, next(self._local_offsets))
                outcome = await self.processor.append(result, source, 0)
                offsets.extend(outcome.offsets)
        return pb.PublishReply(offsets=offsets)


def _traced(processed: Processed, traceparent: str) -> Processed:
    if not traceparent:
        return processed
    items = [(channel, replace(event, trace=traceparent)) for channel, event in processed.items]
    return replace(processed, items=items)


def add_to_server(servicer: SignalmanServicer, server: grpc.aio.Server) -> None:
    """Like the generated ``add_SignalmanServicer_to_server`` but Subscribe gets raw bytes."""
    handlers = {
        "Subscribe": grpc.stream_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=None,  # bytes: decoded in _read with a clear error
            # Every message is written already serialized (events as spliced bytes, see
            # signalman.wire): no serializer call per delivery.
            response_serializer=None,
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=pb.GetStatsRequest.FromString,
            response_serializer=pb.HubStats.SerializeToString,
        ),
        "Publish": grpc.unary_unary_rpc_method_handler(
            servicer.Publish,
            request_deserializer=pb.PublishRequest.FromString,
            response_serializer=pb.PublishReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
