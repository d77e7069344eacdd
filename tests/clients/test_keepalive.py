"""Keepalive that works with servers we do not own: grpc's default server settings accept it.

A grpc-core server with default settings accepts one ping per 5 minutes and none while no call
is active; three pings sooner and it answers GOAWAY too_many_pings, which ends every stream on
the connection. The default pairing is checked on the options the library emits; a real quiet
stream then runs against a server whose only non-default setting is that minimum, scaled down
to seconds, with the client's interval scaled alike.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio
import pytest

from pkg.clients import KeepalivePolicy, Policy, aio_channel, foghorn, signalman
from pkg.clients.grpc_core import channel_options
from pkg.clients.policy import (
    GRPC_DEFAULT_SERVER_MIN_PING_INTERVAL_S,
    GRPC_DEFAULT_SERVER_PERMITS_PINGS_WITHOUT_CALLS,
    PLATFORM_KEEPALIVE,
)
from pkg.clients.targets import resolve_targets
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from pkg.testsvc.server import TestServicer as Servicer

# grpc-core's server defaults (chttp2 ping abuse policy): the values a server has when it sets
# none of these arguments.
GRPC_SERVER_DEFAULT_MIN_RECV_PING_INTERVAL_MS = 300_000
GRPC_SERVER_DEFAULT_PERMIT_WITHOUT_CALLS = 0

# The scaled pairing of the real stream test: the server's minimum, and the client's interval
# in the same ratio to it as the defaults (grpc-core clients never ping more than once a
# second, so 1 s is the smallest server minimum a test can scale to).
SCALED_SERVER_MIN_MS = 1_000
SCALE = SCALED_SERVER_MIN_MS / GRPC_SERVER_DEFAULT_MIN_RECV_PING_INTERVAL_MS


def test_default_keepalive_is_what_a_default_grpc_server_accepts() -> None:
    targets: tuple[str | list[str], ...] = ("127.0.0.1:1", ["127.0.0.1:1", "127.0.0.1:2"])
    for target in targets:
        options = dict(channel_options(resolve_targets(target), (), Policy().keepalive))
        assert options["grpc.keepalive_time_ms"] >= GRPC_SERVER_DEFAULT_MIN_RECV_PING_INTERVAL_MS
        assert (
            options["grpc.keepalive_permit_without_calls"]
            <= GRPC_SERVER_DEFAULT_PERMIT_WITHOUT_CALLS
        )
    # The constants the library documents are grpc's.
    assert GRPC_DEFAULT_SERVER_MIN_PING_INTERVAL_S * 1000 == (
        GRPC_SERVER_DEFAULT_MIN_RECV_PING_INTERVAL_MS
    )
    assert int(GRPC_DEFAULT_SERVER_PERMITS_PINGS_WITHOUT_CALLS) == (
        GRPC_SERVER_DEFAULT_PERMIT_WITHOUT_CALLS
    )


def test_keepalive_is_configurable_per_channel_and_validated() -> None:
    options = dict(
        channel_options(
            resolve_targets("127.0.0.1:1"),
            (),
            KeepalivePolicy(time=20.0, timeout=5.0, without_calls=True),
        )
    )
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    with pytest.raises(ValueError, match=r"keepalive\.time"):
        KeepalivePolicy(time=0)


@asynccontextmanager
async def default_server(min_ping_interval_ms: int) -> AsyncIterator[int]:
    """A plain grpc.aio server with grpc's defaults but the ping minimum (scaled down)."""
    server = grpc.aio.server(
        options=[("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms)]
    )
    pb_grpc.add_TestServiceServicer_to_server(Servicer("default"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def _quiet_stream(port: int, keepalive: KeepalivePolicy, quiet_s: float) -> float:
    """Open a stream that stays silent ``quiet_s`` between its two messages; how long it held."""
    channel = aio_channel(f"127.0.0.1:{port}", Policy(keepalive=keepalive))
    stub = pb_grpc.TestServiceStub(channel)
    start = time.monotonic()
    seqs = []
    try:
        async for reply in stub.ServerStream(
            pb.StreamRequest(key="quiet", count=2, interval_s=quiet_s)
        ):
            seqs.append(reply.seq)
    finally:
        held = time.monotonic() - start
        await channel.close()
    assert seqs == [0, 1]
    return held


async def test_a_quiet_stream_outlives_five_ping_intervals_on_a_default_server() -> None:
    default = KeepalivePolicy()
    interval = default.time * SCALE  # 1.1 s against the server's 1 s, as 330 s against 300 s
    scaled = KeepalivePolicy(time=interval, timeout=5.0, without_calls=default.without_calls)
    async with default_server(SCALED_SERVER_MIN_MS) as port:
        held = await _quiet_stream(port, scaled, quiet_s=6 * interval)
    assert held >= 5 * interval


async def test_pinging_faster_than_a_default_server_allows_kills_the_stream() -> None:
    # The control, showing the test above can fail: pings three times as often as the server
    # permits (the old default pinged every 20 s against grpc's 300 s) end the stream.
    async with default_server(3 * SCALED_SERVER_MIN_MS) as port:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _quiet_stream(port, KeepalivePolicy(time=1.0, timeout=5.0), quiet_s=8.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_platforms_typed_clients_ping_as_often_as_our_servers_permit() -> None:
    # Our servers (pkg.common.grpcserver) accept a ping every 10 s, also without calls: the
    # Foghorn and Signalman clients use that to notice a silent replica within 30 s.
    for policy in (foghorn.default_policy(), signalman.default_policy()):
        assert policy.keepalive == PLATFORM_KEEPALIVE
    assert PLATFORM_KEEPALIVE.time >= 10.0 and PLATFORM_KEEPALIVE.without_calls
