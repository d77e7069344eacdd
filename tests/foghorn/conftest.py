"""Foghorn test fixtures: an in-process Foghorn on real gRPC, typed clients, fake nodes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from api_balancing.config import FoghornConfig
from api_balancing.server import FoghornApp
from pkg.clients import Policy, set_testing
from pkg.clients.foghorn import ControlStream, FoghornClient
from pkg.common.clock import FakeClock
from pkg.events import MemorySink
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.waiting import eventually as shared_eventually

TOKEN = "node-secret"
RELAY_TOKEN = "relay-secret"
# One credential that is both operator and node keeps these functional tests short; the
# separation of roles is what tests/security proves.
TOKENS = f"{TOKEN}=ops:operator|node;nodes=*;tenants=*;streams=100000,{RELAY_TOKEN}=relay:replica"


@pytest.fixture(autouse=True)
def _instant_backoff() -> Any:
    set_testing(True)
    yield
    set_testing(False)


class NodeStream(ControlStream):
    """A hand-driven node control stream: send messages, read what Foghorn pushes."""

    announced: list[str] = []

    async def register(self, identity: pb.Register) -> pb.Registered:
        self.send(pb.NodeMessage(register=identity))
        reply = await self.read()
        assert reply.WhichOneof("msg") == "registered", reply
        return reply.registered

    def report(self, report: pb.LoadReport) -> None:
        self.send(pb.NodeMessage(report=report))

    async def read(self, timeout: float = 10.0) -> pb.ControlMessage:
        """The next message, past replica-list announcements (kept in ``announced``), which
        an HA replica sends after Registered and whenever its cluster changes."""
        while True:
            msg = await asyncio.wait_for(self.call.read(), timeout)
            assert msg is not grpc.aio.EOF, "stream ended"
            assert isinstance(msg, pb.ControlMessage)
            if msg.WhichOneof("msg") != "replicas":
                return msg
            self.announced = list(msg.replicas.addresses)

    async def status(self, timeout: float = 10.0) -> grpc.StatusCode:
        """Wait for the stream to end and return its status code."""
        try:
            while True:
                msg = await asyncio.wait_for(self.call.read(), timeout)
                if msg is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await self.call.code()

    async def close(self) -> None:
        self.end()
        self.call.cancel()


def register_msg(
    node_id: str,
    lat: float | None = 50.0,
    lon: float | None = 8.0,
    *,
    roles: tuple[str, ...] = ("edge",),
    caps: tuple[str, ...] = ("hls", "webrtc"),
    capacity: int = 1000,
    region: str = "test",
) -> pb.Register:
    msg = pb.Register(
        node_id=node_id,
        roles=list(roles),
        capabilities=list(caps),
        base_url=f"http://{node_id}.example:8080",
        capacity=capacity,
        region=region,
    )
    if lat is not None and lon is not None:
        msg.location.CopyFrom(pb.GeoPoint(latitude=lat, longitude=lon))
    return msg


def report_msg(
    cpu: float = 10.0,
    *,
    ram_used: int = 1 << 30,
    ram_max: int = 8 << 30,
    up: int = 100_000_000,
    limit: int = 10_000_000_000,
    streams: tuple[tuple[str, str, int], ...] = (),
) -> pb.LoadReport:
    return pb.LoadReport(
        cpu_percent=cpu,
        ram_used_bytes=ram_used,
        ram_max_bytes=ram_max,
        upload_bps=up,
        download_bps=1000,
        bandwidth_limit_bps=limit,
        streams=[pb.StreamLoad(stream_id=s, tenant_id=t, viewers=v) for s, t, v in streams],
    )


eventually = functools.partial(shared_eventually, timeout=10.0)


class Harness:
    """An in-process Foghorn plus clients: authenticated (ops), anonymous, and fake nodes."""

    def __init__(self, server: FoghornApp, clock: FakeClock | None, events: Any) -> None:
        self.server = server
        self.clock = clock
        self.events = events
        policy = Policy(timeout=10.0)
        self.ops = FoghornClient(server.grpc_target, token=TOKEN, policy=policy)
        self.anon = FoghornClient(server.grpc_target, policy=policy)
        self.streams: list[NodeStream] = []

    @property
    def fleet(self) -> Any:
        return self.server.fleet

    async def node(
        self, node_id: str, report: pb.LoadReport | None = None, **register: Any
    ) -> NodeStream:
        """Connect, register and (optionally) report; waits until the report is stored."""
        stream = NodeStream(self.ops)
        self.streams.append(stream)
        await stream.register(register_msg(node_id, **register))
        if report is not None:
            before = self.reports_of(node_id)
            stream.report(report)
            await eventually(lambda: self.reports_of(node_id) > before, what=f"{node_id} report")
        return stream

    def reports_of(self, node_id: str) -> int:
        rec = self.server.store.get(node_id)
        return rec.reports_accepted if rec else 0

    async def close(self) -> None:
        for s in self.streams:
            await s.close()
        await self.ops.close()
        await self.anon.close()
        await self.server.stop(grace=0.5)


@pytest.fixture
async def make_foghorn() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Build in-process Foghorns (real gRPC on loopback); ``fake_clock=True`` for timing."""
    harnesses: list[Harness] = []

    async def make(fake_clock: bool = False, **overrides: Any) -> Harness:
        clock = FakeClock() if fake_clock else None
        # With a Kafka bootstrap the server builds its real sink; otherwise events are recorded.
        events: Any = None if overrides.get("kafka_bootstrap") else MemorySink()
        # Functional tests route far faster than an anonymous viewer may: the per-address
        # limit is tested on its own (tests/security), not in every routing test.
        overrides.setdefault("anon_routes_per_s", 100_000.0)
        overrides.setdefault("anon_route_burst", 100_000)
        config = FoghornConfig(
            grpc_port=0,
            http_port=overrides.pop("http_port", -1),
            tokens=TOKENS,
            replica_id="test-replica",
            **overrides,
        )
        kwargs: dict[str, Any] = {"events": events, "run_reaper": False}
        if clock is not None:
            kwargs["clock"] = clock
        server = FoghornApp(config, **kwargs)
        await server.start()
        harness = Harness(server, clock, server.events)
        harnesses.append(harness)
        return harness

    yield make
    for h in harnesses:
        await h.close()


@pytest.fixture
async def foghorn(make_foghorn: Callable[..., Awaitable[Harness]]) -> Harness:
    return await make_foghorn()
