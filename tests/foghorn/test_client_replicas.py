"""FoghornClient over real Foghorn processes whose replica set changes: a replica added to and
removed from a watched file, a replica killed and restarted (re-admitted by its gRPC health)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from api_balancing.simulator import NodeRunner, build_fleet, configured_replicas
from pkg.clients import Instrumentation, OutlierEvent, OutlierPolicy, Runtime, aio_channel
from pkg.clients.discovery import DnsTargets
from pkg.clients.foghorn import FoghornClient, default_policy
from pkg.clients.grpc_aio import ResilientChannel
from pkg.devstack.servers import CommandProcess, free_port
from tests.foghorn.conftest import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]

TOKEN = "replicas-secret"
BIN = os.path.dirname(sys.executable)


class Returns(Instrumentation):
    def __init__(self) -> None:
        self.events: list[tuple[float, OutlierEvent]] = []

    def on_outlier(self, event: OutlierEvent) -> None:
        self.events.append((time.monotonic(), event))


def _foghorn(process_factory: Callable[..., CommandProcess], name: str) -> CommandProcess:
    return process_factory(
        name,
        [f"{BIN}/foghorn", "--grpc-port", "{port}", "--http-port", str(free_port())],
        env={
            "PLATFORM_TOKENS": f"{TOKEN}=ops:operator|node;nodes=*;tenants=*",
            "FOGHORN_REPLICA_ID": name,
        },
    )


async def test_foghorn_client_follows_a_replica_file_and_readmits_a_restarted_replica(
    process_factory: Callable[..., CommandProcess], tmp_path: Path
) -> None:
    a = _foghorn(process_factory, "fog-a")
    b = _foghorn(process_factory, "fog-b")
    address_a, address_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    listing = tmp_path / "foghorn-replicas"
    listing.write_text(address_a + "\n")
    returns = Returns()
    # A 30 s ejection: only the health check can bring b back within the test's bound.
    policy = dataclasses.replace(
        default_policy(), outlier=OutlierPolicy(base_ejection_time=30.0, max_ejection_time=60.0)
    )
    channel = aio_channel(
        f"file:{listing}", policy, token=TOKEN, runtime=Runtime(instrumentation=[returns])
    )
    assert isinstance(channel, ResilientChannel) and channel.pool is not None
    pool = channel.pool
    client = FoghornClient(f"file:{listing}", channel=channel)
    failures: list[BaseException] = []
    calls = 0

    async def traffic() -> None:
        nonlocal calls
        while True:
            try:
                await client.list_nodes()
            except Exception as exc:
                failures.append(exc)
            calls += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(traffic())
    try:
        listing.write_text(f"{address_a}\n{address_b}\n")  # a replica joins: no restart
        await eventually(lambda: address_b in pool.channels, timeout=10, what="b connected")
        await eventually(
            lambda: pool.detector.addresses == [address_a, address_b], timeout=10, what="b used"
        )
        b.kill()
        await eventually(
            lambda: any(e.ejected and e.replica == address_b for _, e in returns.events),
            timeout=15,
            what="b ejected",
        )
        await asyncio.to_thread(b.start)  # the calls and the checks go on meanwhile
        back = time.monotonic()

        def readmitted() -> bool:
            return any(
                not e.ejected and e.replica == address_b and e.reason == "health check: SERVING"
                for _, e in returns.events
            )

        await eventually(readmitted, timeout=10, what="b re-admitted by its health")
        at = next(t for t, e in returns.events if not e.ejected and e.replica == address_b)
        assert at - back < 2.0, f"re-admitted {at - back:.2f}s after b listened again"
        listing.write_text(f"{address_b}\n")  # a is removed
        await eventually(lambda: address_a not in pool.channels, timeout=10, what="a dropped")
        before = calls
        await eventually(lambda: calls > before + 5, timeout=10, what="calls on b alone")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await channel.close()
    assert failures == []  # nothing failed while replicas joined, died, returned and left


async def test_edge_sim_finds_foghorn_through_a_dns_name(
    process_factory: Callable[..., CommandProcess],
) -> None:
    foghorn = _foghorn(process_factory, "fog-dns")
    # getaddrinfo here gives 127.0.0.1 for localhost: the name stands for one replica.
    process_factory(
        "edge-sim",
        [f"{BIN}/edge-sim", "--foghorn", f"dns:///localhost:{foghorn.port}", "--nodes", "3",
         "--token", TOKEN, "--interval", "0.5", "--status-every", "0"],
        ready_port=foghorn.port,
    )  # fmt: skip
    client = FoghornClient(f"dns:///localhost:{foghorn.port}", token=TOKEN)
    try:

        async def registered() -> bool:
            return len(await client.list_nodes(connected_only=True)) == 3

        await eventually(registered, timeout=30, what="edge-sim nodes registered via DNS")
    finally:
        await client.close()


async def test_edge_sim_nodes_follow_a_dns_name_re_resolved_after_their_streams_fail(
    process_factory: Callable[..., CommandProcess], tmp_path: Path
) -> None:
    a = _foghorn(process_factory, "fog-old")
    b = _foghorn(process_factory, "fog-new")
    zone = tmp_path / "zone.json"

    def publish(*records: str) -> None:
        zone.write_text(json.dumps({"foghorn.internal": list(records)}))

    def resolver(host: str, port: int) -> list[str]:
        return list(json.loads(zone.read_text())[host])

    publish(f"127.0.0.1:{a.port}")
    # The periodic refresh an hour away: only the nodes' failures can trigger re-resolution.
    source = DnsTargets("foghorn.internal", 8008, resolver=resolver, interval=3600.0)
    replicas = configured_replicas(source, TOKEN)
    runners = [NodeRunner(n, replicas, 0.3, slot=i) for i, n in enumerate(build_fleet(3, 5))]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        await eventually(
            lambda: all(r.connected.is_set() for r in runners), timeout=20, what="nodes on a"
        )
        publish(f"127.0.0.1:{b.port}")  # the name now points at the new replica only
        before = source.refreshes
        a.kill()
        await eventually(
            lambda: all(
                r.connected.is_set() and r.address == f"127.0.0.1:{b.port}" for r in runners
            ),
            timeout=20,
            what="nodes moved to the replica the name resolves to now",
        )
        assert source.refreshes > before
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await replicas.close()
        await source.close()
