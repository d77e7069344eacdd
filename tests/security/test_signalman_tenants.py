"""Signalman over raw grpcio: a tenant credential reads its own tenant's events only, never the
SYSTEM channel, and never publishes; platform credentials read the SYSTEM channel only; events
too large for a subscriber message are refused at intake (batches under the limit:
tests/signalman/test_batch_bytes.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.security import conftest as sec
from tests.security.conftest import Signalman

pytestmark = pytest.mark.integration

SUBSCRIBE = "/signalman.v1.Signalman/Subscribe"
PUBLISH = "/signalman.v1.Signalman/Publish"


def event(tenant: str, type_: str = "stream.started", **data: Any) -> str:
    return json.dumps({"id": uuid.uuid4().hex, "type": type_, "tenant": tenant, "data": data})


class Sub:
    """One raw Subscribe stream."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.out: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
        self.call = channel.stream_stream(
            SUBSCRIBE,
            request_serializer=pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString,
        )(self._requests(), metadata=sec.auth(token))

    async def _requests(self) -> AsyncIterator[pb.ClientMessage]:
        while (msg := await self.out.get()) is not None:
            yield msg

    async def subscribe(self, *channels: str) -> pb.ServerMessage:
        req = pb.SubscribeRequest(channels=[pb.ChannelSubscription(channel=c) for c in channels])
        self.out.put_nowait(pb.ClientMessage(request_id=1, subscribe=req))
        return await self.read()

    async def read(self, timeout: float = 10.0) -> pb.ServerMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        assert msg is not grpc.aio.EOF
        return msg  # type: ignore[return-value]

    async def events(self, count: int) -> list[pb.Event]:
        got: list[pb.Event] = []
        while len(got) < count:
            msg = await self.read()
            kind = msg.WhichOneof("kind")
            if kind == "event":
                got.append(msg.event)
            elif kind == "batch":
                got.extend(msg.batch.events)
        return got


async def publish(channel: grpc.aio.Channel, token: str, *events: str) -> Any:
    return await channel.unary_unary(
        PUBLISH,
        request_serializer=pb.PublishRequest.SerializeToString,
        response_deserializer=pb.PublishReply.FromString,
    )(pb.PublishRequest(events_json=list(events)), metadata=sec.auth(token), timeout=10)


async def test_a_tenant_reads_only_its_own_events(signalman: Signalman) -> None:
    async with grpc.aio.insecure_channel(signalman.target) as channel:
        acme = Sub(channel, sec.ACME_USER)
        assert (await acme.subscribe("all")).WhichOneof("kind") == "subscribed"
        await publish(channel, sec.SYSTEM, event("globex", n=1), event("acme", n=2))
        (only,) = await acme.events(1)
        assert only.tenant == "acme" and json.loads(only.data_json) == {"n": 2}
        with pytest.raises(TimeoutError):  # and nothing else arrives
            await acme.read(timeout=1.0)
        acme.call.cancel()


async def test_a_tenant_cannot_read_the_system_channel(signalman: Signalman) -> None:
    async with grpc.aio.insecure_channel(signalman.target) as channel:
        for token in (sec.ACME_USER, sec.ACME_ADMIN):
            sub = Sub(channel, token)
            reply = await sub.subscribe("system")
            assert reply.WhichOneof("kind") == "error"
            assert reply.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            sub.call.cancel()


async def test_an_operator_reads_the_system_channel_and_no_tenants(signalman: Signalman) -> None:
    async with grpc.aio.insecure_channel(signalman.target) as channel:
        ops = Sub(channel, sec.OPS)
        denied = await ops.subscribe("streams")
        assert denied.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert (await ops.subscribe("system")).WhichOneof("kind") == "subscribed"
        await publish(channel, sec.SYSTEM, event("acme"), event("system", "node.registered"))
        (only,) = await ops.events(1)
        assert only.tenant == "system" and only.type == "node.registered"
        ops.call.cancel()


async def test_only_the_platform_publishes_and_only_valid_tenant_ids(
    signalman: Signalman,
) -> None:
    async with grpc.aio.insecure_channel(signalman.target) as channel:
        for token in (sec.ACME_ADMIN, sec.ACME_USER, sec.OPS, sec.NODE_PARIS):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await publish(channel, token, event("acme"))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, token
        for bad in ("Acme", "acme:globex", "a" * 64, ""):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await publish(channel, sec.SYSTEM, event(bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


async def test_an_event_too_large_for_a_subscriber_message_is_refused(
    signalman: Signalman,
) -> None:
    async with grpc.aio.insecure_channel(signalman.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # limit 64 KiB - 1 KiB framing
            await publish(channel, sec.SYSTEM, event("acme", blob="x" * 64_600))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than a subscriber message carries" in (err.value.details() or "")
