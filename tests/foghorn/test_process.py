"""A real ``foghorn`` process with a real ``edge-sim`` fleet, driven like an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.devstack.servers import CommandProcess, free_port
from tests.foghorn.conftest import eventually

pytestmark = [pytest.mark.integration, pytest.mark.failure]

TOKEN = "proc-secret"
NODES = 12
BIN = os.path.dirname(sys.executable)


def _foghorn(process_factory: Callable[..., CommandProcess], http_port: int) -> CommandProcess:
    return process_factory(
        "foghorn",
        [f"{BIN}/foghorn", "--grpc-port", "{port}", "--http-port", str(http_port)],
        env={
            "PLATFORM_TOKENS": f"{TOKEN}=ops:operator|node;nodes=*;tenants=*",
            "FOGHORN_REPLICA_ID": "proc-1",
        },
    )


async def test_foghorn_process_routes_a_simulated_fleet_and_survives_a_restart(
    process_factory: Callable[..., CommandProcess],
) -> None:
    foghorn = _foghorn(process_factory, free_port())
    target = f"127.0.0.1:{foghorn.port}"
    process_factory(
        "edge-sim",
        [f"{BIN}/edge-sim", "--foghorn", target, "--nodes", str(NODES), "--token", TOKEN,
         "--interval", "0.5", "--status-every", "0"],
        ready_port=foghorn.port,
    )  # fmt: skip
    client = FoghornClient(target, token=TOKEN, policy=Policy(timeout=5.0))
    try:

        async def fleet_up() -> bool:
            try:
                nodes = await client.list_nodes(connected_only=True)
            except grpc.aio.AioRpcError:  # Foghorn is (re)starting: keep polling
                return False
            return len(nodes) == NODES and all(n.HasField("last_report") for n in nodes)

        await eventually(fleet_up, timeout=30, what="simulated fleet registered and reporting")

        # A viewer in Paris goes to a node nearby (the first 12 nodes sit in Europe and the US).
        route = await client.route_viewer("live-0001", lat=48.85, lon=2.35)
        assert route.best.distance_km < 1500, route.best
        best = route.best.node_id

        # Draining takes it out of routing, the node acks, and it sheds its viewers.
        reply = await client.set_mode(best, "draining", ack_timeout_s=5)
        assert reply.command.acked and reply.command.ok
        assert (await client.route_viewer("live-0001", lat=48.85, lon=2.35)).best.node_id != best

        async def shed() -> bool:
            node = await client.get_node(best)
            return sum(s.viewers for s in node.last_report.streams) == 0

        await eventually(shed, timeout=30, what="draining node shed its viewers")

        # The admin CLI, as an operator runs it.
        out = subprocess.run(
            [f"{BIN}/foghorn-admin", "--foghorn", target, "--token", TOKEN, "nodes"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "NODE" in out and f"{NODES} node(s)" in out and "draining" in out

        def admin(*args: str) -> str:
            return subprocess.run(
                [f"{BIN}/foghorn-admin", "--foghorn", target, "--token", TOKEN, *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout

        explain = admin("explain", "live-0001", "--lat", "48.85", "--lon", "2.35")
        assert "weights: cpu=500" in explain and f"{best}" in explain and "draining" in explain
        routed = admin("route", "live-0001", "--lat", "48.85", "--lon", "2.35")
        assert "RANK" in routed and "/hls/live-0001/index.m3u8" in routed and best not in routed

        # Kill Foghorn; the fleet reconnects by itself to the restarted process.
        foghorn.kill()
        foghorn.start()
        await eventually(fleet_up, timeout=60, what="fleet reconnected after restart")
    finally:
        await client.close()


def test_admin_cli_reports_errors_with_the_status(process_factory) -> None:  # type: ignore[no-untyped-def]
    foghorn = _foghorn(process_factory, -1)
    target = f"127.0.0.1:{foghorn.port}"
    unknown = subprocess.run(
        [f"{BIN}/foghorn-admin", "--foghorn", target, "--token", TOKEN, "node", "ghost"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    anon = subprocess.run(
        [f"{BIN}/foghorn-admin", "--foghorn", target, "--token", "", "nodes"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert anon.returncode == 1 and "UNAUTHENTICATED" in anon.stderr
