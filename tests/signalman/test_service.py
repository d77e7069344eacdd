"""Signalman's wire API on an embedded replica: tenancy, channels, resume, gaps, backpressure,
bad input. (Kafka, Redis and replicas are covered by the integration tests.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from api_realtime.server import SignalmanApp
from pkg.clients import aio_channel
from pkg.clients.signalman import Gap, Position, SignalmanClient, SubscriptionError
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import event_json, wait_until

SUBSCRIBE = "/signalman.v1.Signalman/Subscribe"

Connect = Callable[[str], SignalmanClient]


class RawStream:
    """A Subscribe call driven message by message (bytes in, ServerMessage out)."""

    def __init__(self, client: SignalmanClient, channel: grpc.aio.Channel | None = None) -> None:
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        method = (channel or client.channel()).stream_stream(
            SUBSCRIBE, request_serializer=None, response_deserializer=pb.ServerMessage.FromString
        )
        self.call: Any = method(self._requests())

    async def _requests(self) -> AsyncIterator[bytes]:
        while (item := await self._out.get()) is not None:
            yield item

    async def send(self, msg: pb.ClientMessage | bytes | None) -> None:
        """Send a message (``None`` half-closes the request stream)."""
        if msg is None or isinstance(msg, bytes):
            await self._out.put(msg)
        else:
            await self._out.put(msg.SerializeToString())

    async def recv(self, timeout: float = 10.0) -> pb.ServerMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        assert msg is not grpc.aio.EOF, "stream ended"
        return msg  # type: ignore[no-any-return]

    async def status(self, timeout: float = 20.0) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                msg = await asyncio.wait_for(self.call.read(), timeout)
                if msg is grpc.aio.EOF:
                    await self.call
                    break
        return info.value.code()  # type: ignore[no-any-return]


def subscribe_msg(*channels: str, request_id: int = 1, **resume: Any) -> pb.ClientMessage:
    subs = [pb.ChannelSubscription(channel=c, **resume) for c in channels]
    return pb.ClientMessage(request_id=request_id, subscribe=pb.SubscribeRequest(channels=subs))


async def publish(connect: Connect, token: str, *events: str) -> list[int]:
    return await connect(token).publish(list(events))


async def test_tenant_never_sees_another_tenants_events(connect: Connect) -> None:
    async with connect("ta").subscribe(["all"]) as acme, connect("tb").subscribe(["all"]) as glob:
        await acme.wait_subscribed()
        await glob.wait_subscribed()
        await publish(connect, "tpb", event_json("globex", "stream.started", n=1))
        await publish(connect, "tpa", event_json("acme", "stream.started", n=2))
        got = await acme.get(5)
        assert isinstance(got, pb.Event) and got.tenant == "acme"
        other = await glob.get(5)
        assert isinstance(other, pb.Event) and other.tenant == "globex"
        with pytest.raises(TimeoutError):
            await acme.get(0.3)


async def test_events_arrive_in_order_per_tenant(connect: Connect) -> None:
    async with connect("ta").subscribe(["streams"]) as sub:
        await sub.wait_subscribed()
        for i in range(60):
            await publish(connect, "tpa", event_json("acme", "stream.started", seq=i))
        seqs, offsets = [], []
        for _ in range(60):
            item = await sub.get(5)
            assert isinstance(item, pb.Event)
            seqs.append(json.loads(item.data_json)["seq"])
            offsets.append(item.offset)
        assert seqs == list(range(60))
        assert offsets == sorted(offsets) and len(set(offsets)) == 60


async def test_channels_filter_events_by_type(connect: Connect) -> None:
    async with connect("ta").subscribe(["routing"]) as sub:
        await sub.wait_subscribed()
        await publish(
            connect,
            "tpa",
            event_json("acme", "stream.started"),
            event_json("acme", "routing.decision"),
        )
        item = await sub.get(5)
        assert isinstance(item, pb.Event) and item.type == "routing.decision"
        assert item.channel == "routing"


async def test_system_channel_requires_system_role(connect: Connect) -> None:
    with pytest.raises(SubscriptionError) as info:
        async with connect("ta").subscribe(["system"]) as sub:
            await sub.get(5)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    async with connect("tsys").subscribe(["system"]) as sys_sub:
        await sys_sub.wait_subscribed()
        await publish(connect, "tsys", event_json("system", "node.registered", node="n1"))
        item = await sys_sub.get(5)
        assert isinstance(item, pb.Event) and item.type == "node.registered"


async def test_secrets_are_redacted_before_delivery(connect: Connect) -> None:
    async with connect("ta").subscribe(["routing"]) as sub:
        await sub.wait_subscribed()
        await publish(
            connect, "tpa",
            event_json("acme", "routing.decision", viewer_ip="203.0.113.77", api_token="s3cr3t"),
        )  # fmt: skip
        item = await sub.get(5)
        assert isinstance(item, pb.Event)
        data = json.loads(item.data_json)
        assert data["api_token"] == "[redacted]"
        assert data["viewer_ip"] == "203.0.113.0/24"


async def test_resume_delivers_missed_events_without_duplicates(connect: Connect) -> None:
    async with connect("ta").subscribe(["streams"]) as sub:
        await sub.wait_subscribed()
        await publish(connect, "tpa", *[event_json("acme", seq=i) for i in range(3)])
        seen = [await sub.get(5) for _ in range(3)]
    last = seen[-1]
    assert isinstance(last, pb.Event)
    await publish(connect, "tpa", *[event_json("acme", seq=i) for i in range(3, 8)])
    resume = {"streams": (last.epoch, last.offset)}
    async with connect("ta").subscribe(["streams"], resume_from=resume) as again:
        items = [await again.get(5) for _ in range(5)]
        assert [json.loads(i.data_json)["seq"] for i in items if isinstance(i, pb.Event)] == [
            3, 4, 5, 6, 7,
        ]  # fmt: skip
        await publish(connect, "tpa", event_json("acme", seq=8))
        live = await again.get(5)
        assert isinstance(live, pb.Event) and json.loads(live.data_json)["seq"] == 8
        with pytest.raises(TimeoutError):
            await again.get(0.3)
        assert again.stats.duplicates_skipped == 0


async def test_history_gap_when_epoch_changed(app: SignalmanApp, connect: Connect) -> None:
    await publish(connect, "tpa", *[event_json("acme", seq=i) for i in range(3)])
    old_epoch = (await app.history.info("acme")).epoch
    app.history.lose_everything()  # type: ignore[attr-defined]
    await publish(connect, "tpa", event_json("acme", seq=100))
    async with connect("ta").subscribe(["streams"], resume_from={"streams": (old_epoch, 2)}) as s:
        gap = await s.get(5)
        assert isinstance(gap, Gap) and gap.epoch != old_epoch and "epoch" in gap.reason
        item = await s.get(5)
        assert isinstance(item, pb.Event) and json.loads(item.data_json)["seq"] == 100


async def test_an_event_appended_again_after_the_history_was_lost_is_delivered_once(
    app: SignalmanApp, connect: Connect
) -> None:
    # A history store failover re-appends what the old primary had not replicated: the same
    # event (same id) in the new epoch. A subscriber that had it gets it once.
    again = event_json("acme", seq=1)
    async with connect("ta").subscribe(["streams"]) as sub:
        await sub.wait_subscribed()
        await publish(connect, "tpa", again)
        first = await sub.get(5)
        assert isinstance(first, pb.Event) and json.loads(first.data_json)["seq"] == 1
        app.history.lose_everything()  # type: ignore[attr-defined]
        await publish(connect, "tpa", again, event_json("acme", seq=2))
        seqs = []
        while not seqs or seqs[-1] != 2:
            item = await sub.get(5)
            if isinstance(item, pb.Event):
                seqs.append(json.loads(item.data_json)["seq"])
        assert seqs == [2]
        assert sub.stats.duplicates_skipped == 1


def test_the_dedupe_window_forgets_the_oldest_ids() -> None:
    pos = Position()
    assert [pos.seen(i, 3) for i in ("a", "b", "c", "a")] == [False, False, False, True]
    assert pos.seen("d", 3) is False  # "a" drops out of the window
    assert pos.seen("a", 3) is False
    assert pos.seen("", 3) is False and pos.seen("", 3) is False  # no id: never a repeat
    assert Position().seen("x", 0) is False  # window 0: dedupe off


async def test_history_gap_when_trimmed(app: SignalmanApp, connect: Connect) -> None:
    await publish(connect, "tpa", *[event_json("acme", seq=i) for i in range(10)])
    info = await app.history.info("acme")
    await app.history.trim("acme", max_len=4, min_time=0)
    async with connect("ta").subscribe(["streams"], resume_from={"streams": (info.epoch, 1)}) as s:
        gap = await s.get(5)
        assert isinstance(gap, Gap) and gap.resumed_from == 7 and "trimmed" in gap.reason
        items = [await s.get(5) for _ in range(4)]
        assert [i.offset for i in items if isinstance(i, pb.Event)] == [7, 8, 9, 10]


async def test_offset_ahead_of_history_is_rejected(connect: Connect) -> None:
    await publish(connect, "tpa", event_json("acme"))
    raw = RawStream(connect("ta"))
    await raw.send(subscribe_msg("streams", resume=True, after_offset=999_999))
    msg = await raw.recv()
    assert msg.WhichOneof("kind") == "error"
    assert msg.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "after_offset" in msg.error.field and "ahead" in msg.error.message
    raw.call.cancel()


async def test_unknown_channel_gets_invalid_argument(connect: Connect) -> None:
    raw = RawStream(connect("ta"))
    await raw.send(subscribe_msg("weather", request_id=7))
    msg = await raw.recv()
    assert msg.request_id == 7 and msg.WhichOneof("kind") == "error"
    assert msg.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "weather" in msg.error.message and msg.error.field == "channels[0].channel"
    # The stream stays usable after a bad request.
    await raw.send(pb.ClientMessage(request_id=8, ping=pb.Ping(nonce=42)))
    pong = await raw.recv()
    assert pong.WhichOneof("kind") == "pong" and pong.pong.nonce == 42 and pong.request_id == 8
    raw.call.cancel()


async def test_empty_client_message_gets_invalid_argument(connect: Connect) -> None:
    raw = RawStream(connect("ta"))
    await raw.send(pb.ClientMessage(request_id=3))
    msg = await raw.recv()
    assert msg.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and msg.error.field == "kind"
    raw.call.cancel()


async def test_garbled_client_message_ends_stream_with_invalid_argument(connect: Connect) -> None:
    raw = RawStream(connect("ta"))
    await raw.send(b"\xff\xff\xff\xff garbage")
    assert await raw.status() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_client_message_is_refused(connect: Connect) -> None:
    raw = RawStream(connect("ta"))
    huge = pb.ClientMessage(
        request_id=1,
        subscribe=pb.SubscribeRequest(channels=[pb.ChannelSubscription(channel="x" * 200_000)]),
    )
    await raw.send(huge)
    assert await raw.status() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_subscribe_without_token_is_unauthenticated(connect: Connect) -> None:
    raw = RawStream(connect(""))
    await raw.send(subscribe_msg("streams"))
    assert await raw.status() == grpc.StatusCode.UNAUTHENTICATED
    bad = RawStream(connect("not-a-token"))
    await bad.send(subscribe_msg("streams"))
    assert await bad.status() == grpc.StatusCode.UNAUTHENTICATED


async def test_token_without_tenant_is_refused(connect: Connect) -> None:
    raw = RawStream(connect("tnotenant"))
    await raw.send(subscribe_msg("streams"))
    assert await raw.status() == grpc.StatusCode.PERMISSION_DENIED


async def test_per_tenant_connection_cap(app: SignalmanApp, connect: Connect) -> None:
    streams = []
    for _ in range(app.config.max_connections_per_tenant):
        raw = RawStream(connect("ta"))
        await raw.send(subscribe_msg("streams"))
        assert (await raw.recv()).WhichOneof("kind") == "subscribed"
        streams.append(raw)
    over = RawStream(connect("ta2"))  # another principal of the same tenant
    await over.send(subscribe_msg("streams"))
    assert await over.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other_tenant = RawStream(connect("tb"))  # other tenants are not affected
    await other_tenant.send(subscribe_msg("streams"))
    assert (await other_tenant.recv()).WhichOneof("kind") == "subscribed"
    for raw in [*streams, other_tenant]:
        raw.call.cancel()


async def test_slow_subscriber_is_dropped_others_keep_receiving(
    app: SignalmanApp, connect: Connect
) -> None:
    # A client that never reads, with HTTP/2 windows that do not grow (no BDP probing), so the
    # server's writes to it block after 64 KiB, as over a slow mobile link.
    tight = aio_channel(f"127.0.0.1:{app.port}", token="ta", options=[("grpc.http2.bdp_probe", 0)])
    slow = RawStream(connect("ta"), tight)
    await slow.send(subscribe_msg("streams"))
    assert (await slow.recv()).WhichOneof("kind") == "subscribed"
    async with connect("ta2").subscribe(["streams"]) as fast:
        await fast.wait_subscribed()
        total = app.config.subscriber_buffer * 10  # far more than the buffer + a 64 KiB window
        payload = "x" * 2_000
        received = 0
        for i in range(0, total, 20):
            await publish(connect, "tpa", *[event_json("acme", seq=i + j, pad=payload)
                                             for j in range(20)])  # fmt: skip
            while True:  # the fast subscriber keeps up the whole time
                try:
                    await fast.get(0.001 if received >= i else 5)
                    received += 1
                except TimeoutError:
                    break
        while received < total:
            await fast.get(5)
            received += 1
        assert fast.stats.reconnects == 0
    # The slow one (never reading) was cut off with a clear status.
    await wait_until(lambda: app.hub.dropped_total >= 1)
    code = await slow.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too slow" in (await slow.call.details() or "")
    await tight.close(None)


async def test_publish_rejects_bad_events_with_the_field(connect: Connect) -> None:
    client = connect("tpa")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.publish(["{not json"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.publish([json.dumps({"type": "stream.started", "id": "x"})])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.publish([event_json("Acme")])  # not the tenant-id syntax
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:  # tenants never publish platform events
        await connect("ta").publish([event_json("acme")])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stats_report_subscribers_and_processing(connect: Connect) -> None:
    async with connect("ta").subscribe(["streams"]) as sub:
        await sub.wait_subscribed()
        await publish(connect, "tpa", event_json("acme"))
        await sub.get(5)
        stats = await connect("ta").stats()
        assert stats.mode == "embedded" and stats.subscribers == 1
        assert stats.subscribers_of_tenant == 1 and stats.events_appended >= 1


async def test_tail_prints_the_tenants_events(app: SignalmanApp, connect: Connect) -> None:
    import io

    from api_realtime.tail import parse_args, tail

    await publish(connect, "tpa", event_json("acme", "stream.started", n=1),
                  event_json("acme", "routing.decision", n=2))  # fmt: skip
    await publish(connect, "tpb", event_json("globex", "stream.started", n=3))
    out = io.StringIO()
    args = parse_args(["--targets", f"127.0.0.1:{app.port}", "--token", "ta", "--from-start",
                       "--json", "--limit", "2", "all"])  # fmt: skip
    assert await asyncio.wait_for(tail(args, out), 10) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["type"], x["data"]["n"], x["tenant"]) for x in lines] == [
        ("stream.started", 1, "acme"), ("routing.decision", 2, "acme"),
    ]  # fmt: skip


async def test_half_closed_client_keeps_receiving(connect: Connect) -> None:
    raw = RawStream(connect("ta"))
    await raw.send(subscribe_msg("streams"))
    await raw.send(None)  # half-close: no more requests
    assert (await raw.recv()).WhichOneof("kind") == "subscribed"
    await publish(connect, "tpa", event_json("acme", n=1))
    msg = await raw.recv()
    assert msg.WhichOneof("kind") == "event" and json.loads(msg.event.data_json)["n"] == 1
    raw.call.cancel()


class _FailingReads:
    """The replica's history, except that the next ``read_after`` raises like a Redis connection
    that died under it (seen right after a Redis restart: the first call on a pooled
    connection to the old server fails, the retry works)."""

    def __init__(self, history: Any) -> None:
        self._history = history
        self.failures_left = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._history, name)

    async def read_after(self, tenant: str, after: int, limit: int) -> Any:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("connection to the history store lost")
        return await self._history.read_after(tenant, after, limit)


async def test_store_failure_while_the_first_message_is_written_ends_the_call_with_a_status(
    app: SignalmanApp, connect: Connect
) -> None:
    # The session fails (history read during resume) while the writer is sending the very first
    # message of the call. The call must still end with UNAVAILABLE so the client reconnects:
    # a call left open with no status is a subscriber that silently receives nothing, forever.
    await publish(connect, "tpa", *[event_json("acme", seq=i) for i in range(3)])
    epoch = (await app.history.info("acme")).epoch
    app.hub.history = _FailingReads(app.hub.history)  # type: ignore[assignment]
    raw = RawStream(connect("ta"))
    await raw.send(subscribe_msg("streams", resume=True, after_offset=1, epoch=epoch))
    assert await raw.status() == grpc.StatusCode.UNAVAILABLE
    # The typed client reconnects on UNAVAILABLE and resumes where it was: nothing is lost.
    resume = {"streams": (epoch, 1)}
    app.hub.history.failures_left = 1  # type: ignore[attr-defined]
    async with connect("ta2").subscribe(["streams"], resume_from=resume) as sub:
        items = [await sub.get(20) for _ in range(2)]
        assert [json.loads(i.data_json)["seq"] for i in items if isinstance(i, pb.Event)] == [1, 2]
        assert sub.stats.reconnects == 1
        await publish(connect, "tpa", event_json("acme", seq=3))
        live = await sub.get(10)
        assert isinstance(live, pb.Event) and json.loads(live.data_json)["seq"] == 3
