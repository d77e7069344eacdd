"""Real processes for the adversarial suite, driven with raw clients (grpcio, httpx).

Nothing here goes through pkg.clients: an attacker does not use our client library. Each
credential below has exactly the role its name says (docs/security.md lists them).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from pkg.devstack.servers import CommandProcess, ServerProcess, free_port
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

# Bridge's adversarial tests run against the same small platform as the interface tests.
from tests.interfaces.conftest import extra_bridge, platform  # noqa: F401

OPS = "sec-operator"
NODE_PARIS = "sec-node-paris"  # registers edge-paris-*, reports tenant acme
NODE_PARIS_2 = "sec-node-paris-2"  # a second token of the SAME credential (rotation)
NODE_BERLIN = "sec-node-berlin"  # registers edge-berlin-*, reports tenant globex
NODE_ROGUE = "sec-node-rogue"  # registers rogue-* and edge-paris-9*, may carry acme too
NODE_SMALL = "sec-node-small"  # at most 2 open streams
RELAY = "sec-relay"
SYSTEM = "sec-system"
NOROLE = "sec-norole"
ACME_USER = "sec-acme-user"
ACME_ADMIN = "sec-acme-admin"
GLOBEX_USER = "sec-globex-user"

TOKENS = ",".join(
    [
        f"{OPS}=ops:operator",
        f"{NODE_PARIS}=edge-paris:node;nodes=edge-paris-*;tenants=acme",
        f"{NODE_PARIS_2}=edge-paris:node;nodes=edge-paris-*;tenants=acme",
        f"{NODE_BERLIN}=edge-berlin:node;nodes=edge-berlin-*;tenants=globex",
        f"{NODE_ROGUE}=rogue:node;nodes=rogue-*|edge-paris-9*;tenants=acme|globex",
        f"{NODE_SMALL}=small:node;nodes=small-*;tenants=acme;streams=2",
        f"{RELAY}=foghorn-relay:replica",
        f"{SYSTEM}=platform:system",
        f"{NOROLE}=nobody",
        f"{ACME_USER}=alice@acme:tenant-user",
        f"{ACME_ADMIN}=alice-admin@acme:tenant-admin",
        f"{GLOBEX_USER}=bob@globex:tenant-user",
    ]
)


def auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass
class Foghorn:
    """One Foghorn process: its gRPC target and HTTP base URL."""

    proc: CommandProcess
    grpc_port: int
    http_port: int
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])
        self.channels.append(channel)
        return channel

    async def nodes(self) -> dict[str, Any]:
        """The operator's /nodes view: node id -> row."""
        async with httpx.AsyncClient(base_url=self.http) as client:
            reply = await client.get("/nodes", headers=dict(auth(OPS)))
        reply.raise_for_status()
        return {row["node_id"]: row for row in reply.json()["nodes"]}

    async def close_channels(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels.clear()


def start_foghorn(run_dir: Path, env: dict[str, str], name: str = "foghorn") -> Foghorn:
    grpc_port, http_port = free_port(), free_port()
    proc = CommandProcess(
        name,
        [sys.executable, "-m", "api_balancing", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port)],
        run_dir=run_dir / name,
        port=grpc_port,
        env={
            "PLATFORM_TOKENS": TOKENS,
            "FOGHORN_REPLICA_ID": name,
            "FOGHORN_REGISTER_TIMEOUT_S": "1",
            "LOG_LEVEL": "WARNING",
            **env,
        },
    )  # fmt: skip
    proc.start()
    return Foghorn(proc, grpc_port, http_port)


@pytest.fixture(scope="module")
def foghorn_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Foghorn]]:
    started: list[Foghorn] = []

    def make(env: dict[str, str] | None = None, name: str = "foghorn") -> Foghorn:
        fog = start_foghorn(tmp_path_factory.mktemp(name), env or {}, name)
        started.append(fog)
        return fog

    try:
        yield make
    finally:
        for fog in reversed(started):
            fog.proc.stop(timeout=5)


@pytest.fixture(scope="module")
def foghorn(foghorn_factory: Callable[..., Foghorn]) -> Foghorn:
    """One embedded Foghorn for the module; tests use their own node ids."""
    return foghorn_factory()


@pytest.fixture
async def channels(foghorn: Foghorn) -> AsyncIterator[Foghorn]:
    try:
        yield foghorn
    finally:
        await foghorn.close_channels()


@dataclass
class Signalman:
    target: str
    http: str


@pytest.fixture(scope="module")
def signalman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signalman]:
    """One embedded Signalman process."""
    grpc_port, http_port = free_port(), free_port()
    proc = CommandProcess(
        "signalman",
        [sys.executable, "-m", "api_realtime"],
        run_dir=tmp_path_factory.mktemp("signalman"),
        port=grpc_port,
        env={
            "PLATFORM_TOKENS": TOKENS,
            "SIGNALMAN_GRPC_PORT": str(grpc_port),
            "SIGNALMAN_HTTP_PORT": str(http_port),
            "LOG_LEVEL": "WARNING",
        },
    )
    proc.start()
    try:
        yield Signalman(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    finally:
        proc.stop(timeout=5)


def register_msg(node_id: str, region: str = "eu-west") -> pb.NodeMessage:
    return pb.NodeMessage(
        register=pb.Register(
            node_id=node_id,
            roles=["edge"],
            capabilities=["hls"],
            base_url=f"http://{node_id}.example:8080",
            location=pb.GeoPoint(latitude=48.85, longitude=2.35),
            capacity=1000,
            region=region,
        )
    )


def report_msg(*streams: tuple[str, str, int], cpu: float = 10.0) -> pb.NodeMessage:
    return pb.NodeMessage(
        report=pb.LoadReport(
            cpu_percent=cpu,
            ram_used_bytes=1 << 30,
            ram_max_bytes=8 << 30,
            upload_bps=1_000_000,
            bandwidth_limit_bps=10_000_000_000,
            streams=[pb.StreamLoad(stream_id=s, tenant_id=t, viewers=v) for s, t, v in streams],
        )
    )


class RawNode:
    """A node control stream over plain grpcio: send messages, read replies, get the status."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None) -> None:
        self.queue: asyncio.Queue[pb.NodeMessage | None] = asyncio.Queue()
        self.call = pb_grpc.NodeControlStub(channel).Connect(self._requests(), metadata=auth(token))

    async def _requests(self) -> AsyncIterator[pb.NodeMessage]:
        while (msg := await self.queue.get()) is not None:
            yield msg

    def send(self, msg: pb.NodeMessage) -> None:
        self.queue.put_nowait(msg)

    async def read(self, timeout: float = 10.0) -> pb.ControlMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        assert msg is not grpc.aio.EOF, "stream ended"
        return msg  # type: ignore[return-value]

    async def register(self, node_id: str, region: str = "eu-west") -> pb.ControlMessage:
        self.send(register_msg(node_id, region))
        return await self.read()

    async def status(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        """Wait for the stream to end: its status code and details."""
        try:
            while await asyncio.wait_for(self.call.read(), timeout) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await self.call.code(), await self.call.details()

    def close(self) -> None:
        self.call.cancel()


def stop_server(server: ServerProcess) -> None:
    server.stop(timeout=5)
