"""Helpers for end-to-end Bridge tests: a real Foghorn, simulated edge nodes, Bridge processes."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from pkg.clients import BreakerPolicy, Policy, RetryPolicy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

FOGHORN_TOKEN = "fog-secret"

# The test's own HTTP client: one attempt, no breaker, so every status reaches the assertion.
TEST_POLICY = Policy(
    timeout=20.0, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(enabled=False)
)


def http_client() -> AsyncHttpClient:
    return AsyncHttpClient(policy=TEST_POLICY)


async def gql(
    client: AsyncHttpClient,
    port: int,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables},
        headers=headers,
    )


async def metric_sum(client: AsyncHttpClient, url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these labels) on a Prometheus /metrics page.

    /metrics needs an operator credential: the tests' Foghorn token is one for Foghorn and for
    Bridge (``BRIDGE_TOKENS`` in ``bridge_env``)."""
    text = (await client.get(url, headers={"authorization": f"Bearer {FOGHORN_TOKEN}"})).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.eE+-]+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll ``await predicate()`` until truthy (bounded); returns its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    value = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(Exception):
            value = await predicate()
            if value:
                return value
        await asyncio.sleep(interval)
    return value


@contextlib.asynccontextmanager
async def edge_nodes(grpc_port: int, ids: list[str]) -> AsyncIterator[None]:
    """Hold a control stream per node (register + load reports) for the duration."""
    client = FoghornClient([f"127.0.0.1:{grpc_port}"], token=FOGHORN_TOKEN)
    calls = []
    stops: list[asyncio.Event] = []

    def messages(
        i: int, node_id: str, stop: asyncio.Event, acks: asyncio.Queue[pb.NodeMessage]
    ) -> AsyncIterator[pb.NodeMessage]:
        async def gen() -> AsyncIterator[pb.NodeMessage]:
            yield pb.NodeMessage(
                register=pb.Register(
                    node_id=node_id,
                    roles=["edge"],
                    capabilities=["hls"],
                    base_url=f"http://127.0.0.1:{9100 + i}",
                    location=pb.GeoPoint(latitude=50.0 + i, longitude=4.0),
                    capacity=1000,
                    region="eu-west",
                )
            )
            while not stop.is_set():
                yield pb.NodeMessage(
                    report=pb.LoadReport(
                        cpu_percent=10.0 + i,
                        ram_used_bytes=1_000_000_000,
                        ram_max_bytes=8_000_000_000,
                        upload_bps=1_000_000,
                        bandwidth_limit_bps=1_000_000_000,
                    )
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    yield await asyncio.wait_for(acks.get(), 1.0)

        return gen()

    async def drain(call: Any, acks: asyncio.Queue[pb.NodeMessage]) -> None:
        # A node acknowledges every command it is sent, like a real edge would.
        with contextlib.suppress(Exception):
            async for msg in call:
                if msg.HasField("command"):
                    ack = pb.CommandAck(request_id=msg.command.request_id, ok=True, message="ok")
                    await acks.put(pb.NodeMessage(ack=ack))

    tasks = []
    for i, node_id in enumerate(ids):
        stop = asyncio.Event()
        stops.append(stop)
        acks: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
        call = client.connect(messages(i, node_id, stop, acks))
        calls.append(call)
        tasks.append(asyncio.create_task(drain(call, acks)))
    try:
        yield
    finally:
        for stop in stops:
            stop.set()
        for call in calls:
            call.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
