"""Benchmark of Foghorn on loopback: ``./dev bench foghorn`` -> ``.bench/foghorn.json``.

A real ``foghorn`` process is loaded with 1,000 simulated nodes (one control stream each,
through pkg.clients) carrying 10,000 streams, then measured in one run:

* ``reports_per_s``: load reports ingested per second by the one instance (server-side count
  over wall time, from the first report sent until the server has stored the last one; the
  median of three bursts of 20 reports per node);
* ``route_p99_us``: server-side p99 of one viewer routing decision over the whole fleet
  (validation, ranking, reply; from the server's own latency window in /health);
* ``route_vs_echo_ratio``: client p50 of RouteViewer over client p50 of a trivial call on the
  same server in the same run (gRPC health Check), calls interleaved so noise hits both alike.
  The same pair over a raw grpc.aio channel is reported beside it as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pkg.clients import Policy
from pkg.clients.foghorn import FoghornClient
from pkg.clients.http import AsyncHttpClient
from pkg.devstack.servers import CommandProcess, free_port
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

TARGETS = {"route_p99_us": 1000.0, "route_vs_echo_ratio": 1.3, "reports_per_s": 5000.0}
TOKEN = "bench-secret"
CITIES = [
    (52.37, 4.90), (50.11, 8.68), (51.51, -0.13), (48.86, 2.35), (40.42, -3.70), (59.33, 18.07),
    (40.71, -74.01), (41.88, -87.63), (34.05, -118.24), (47.61, -122.33), (19.43, -99.13),
    (-23.55, -46.63), (35.68, 139.69), (1.35, 103.82), (19.08, 72.88), (-33.87, 151.21),
    (-26.20, 28.05), (25.20, 55.27),
]  # fmt: skip


class BenchNode:
    """One node's control stream, fed from a queue."""

    def __init__(self, client: FoghornClient, index: int, rng: random.Random) -> None:
        self.queue: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
        lat, lon = CITIES[index % len(CITIES)]
        self.node_id = f"bench-{index:04d}"
        self.register = pb.Register(
            node_id=self.node_id,
            roles=["edge"],
            capabilities=["hls", "webrtc"],
            base_url=f"http://10.0.{index // 250}.{index % 250}:8080",
            location=pb.GeoPoint(latitude=lat + rng.uniform(-1, 1),
                                 longitude=lon + rng.uniform(-1, 1)),
            capacity=10_000,
        )  # fmt: skip
        self.rng = rng
        self.call = client.connect(self._messages())

    async def _messages(self) -> AsyncIterator[pb.NodeMessage]:
        while True:
            yield await self.queue.get()

    def report(self, streams: list[str]) -> pb.NodeMessage:
        rng = self.rng
        return pb.NodeMessage(
            report=pb.LoadReport(
                cpu_percent=rng.uniform(5, 90),
                ram_used_bytes=rng.randint(1, 30) << 30,
                ram_max_bytes=32 << 30,
                upload_bps=rng.randint(0, 8_000_000_000),
                download_bps=1_000_000,
                bandwidth_limit_bps=10_000_000_000,
                streams=[
                    pb.StreamLoad(stream_id=s, tenant_id="bench", viewers=rng.randint(1, 100))
                    for s in streams
                ],
            )
        )


async def _health(http: AsyncHttpClient) -> dict[str, Any]:
    reply = await http.get("/health", timeout=10.0)
    doc: dict[str, Any] = reply.json()
    return doc


async def _wait_reports(http: AsyncHttpClient, want: int, limit_s: float) -> float:
    """Poll /health until the server has accepted ``want`` reports; returns when it did."""
    deadline = time.perf_counter() + limit_s
    while True:
        doc = await _health(http)
        if doc["counts"]["reports_accepted"] >= want:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"server accepted {doc['counts']['reports_accepted']} of {want} reports in time"
            )
        await asyncio.sleep(0.02)


async def _route_vs_echo(
    routing: Any, health: Any, rounds: int, rng: random.Random, streams: int
) -> tuple[list[float], list[float]]:
    route_s: list[float] = []
    echo_s: list[float] = []
    check = health_pb2.HealthCheckRequest(service="")
    perf = time.perf_counter
    for i in range(rounds):
        lat, lon = CITIES[rng.randrange(len(CITIES))]
        request = pb.ViewerRouteRequest(
            content_id=f"live-{rng.randrange(streams):05d}",
            location=pb.GeoPoint(latitude=lat, longitude=lon),
        )
        pair = [("route", routing.RouteViewer, request), ("echo", health.Check, check)]
        if i % 2:
            pair.reverse()  # alternate the order so neither side always goes first
        for kind, method, req in pair:
            start = perf()
            await method(req, timeout=5.0)
            (route_s if kind == "route" else echo_s).append(perf() - start)
    return route_s, echo_s


async def run(nodes: int, streams: int, rounds: int, reports_per_node: int) -> dict[str, Any]:
    port, http_port = free_port(), free_port()
    env = {
        "PLATFORM_TOKENS": f"{TOKEN}=bench:operator|node;nodes=*;tenants=*;streams=100000,"
        "bench-relay=bench-relay:replica",
        "FOGHORN_REPLICA_ID": "bench",
        "FOGHORN_ANON_ROUTES_PER_S": "1000000",  # the benchmark routes anonymously, flat out
        "FOGHORN_ANON_ROUTE_BURST": "1000000",
        "FOGHORN_ROUTING_EVENT_SAMPLE": "0",
        "LOG_LEVEL": "WARNING",
        **{k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
    }
    run_dir = Path(tempfile.mkdtemp(prefix="foghorn-bench-"))
    server = CommandProcess(
        "foghorn",
        [sys.executable, "-m", "api_balancing", "--grpc-port", "{port}", "--http-port",
         str(http_port)],
        run_dir=run_dir,
        port=port,
        env=env,
    )  # fmt: skip
    server.start()
    target = f"127.0.0.1:{port}"
    policy = Policy(timeout=10.0)
    client = FoghornClient(target, token=TOKEN, policy=policy)
    http = AsyncHttpClient(f"http://127.0.0.1:{http_port}", policy, token=TOKEN)  # full /health
    raw = grpc.aio.insecure_channel(target)  # raw-client: baseline
    rng = random.Random(7)
    try:
        # -- load the fleet: 1,000 nodes, 10,000 distinct streams (10 per node) --------
        t0 = time.perf_counter()
        fleet = [BenchNode(client, i, random.Random(i)) for i in range(nodes)]
        for node in fleet:
            node.queue.put_nowait(pb.NodeMessage(register=node.register))
        await asyncio.gather(*(node.call.read() for node in fleet))  # Registered
        per_node = max(1, streams // nodes)
        assignment = [
            [f"live-{(i * per_node + k) % streams:05d}" for k in range(per_node)]
            for i in range(nodes)
        ]
        for node, mine in zip(fleet, assignment, strict=True):
            node.queue.put_nowait(node.report(mine))
        await _wait_reports(http, nodes, 30)
        load_s = time.perf_counter() - t0

        # -- reports/s: every node sends a burst of reports as fast as the stream takes.
        # Three bursts, median reported (all three kept in the JSON): one noisy neighbour
        # on a shared 2-core machine should not decide the figure either way.
        rates = []
        for _ in range(3):
            before = (await _health(http))["counts"]["reports_accepted"]
            burst = [[n.report(assignment[i]) for _ in range(reports_per_node)]
                     for i, n in enumerate(fleet)]  # fmt: skip
            total = nodes * reports_per_node
            start = time.perf_counter()
            for node, msgs in zip(fleet, burst, strict=True):
                for msg in msgs:
                    node.queue.put_nowait(msg)
            done = await _wait_reports(http, before + total, 40)
            rates.append(total / (done - start))
        reports_per_s = statistics.median(rates)

        # -- routing vs trivial call, through pkg.clients and raw -------------------------
        health_stub = health_pb2_grpc.HealthStub(_chan(client))
        await _route_vs_echo(client.routing, health_stub, 200, rng, streams)  # warm-up
        route_s, echo_s = await _route_vs_echo(client.routing, health_stub, rounds, rng, streams)
        raw_route_s, raw_echo_s = await _route_vs_echo(
            pb_grpc.RoutingStub(raw), health_pb2_grpc.HealthStub(raw), rounds // 2, rng, streams
        )
        doc = await _health(http)
        route_p50 = statistics.median(route_s) * 1e6
        echo_p50 = statistics.median(echo_s) * 1e6
        return {
            "nodes": doc["counts"]["nodes"],
            "streams": streams,
            "load_s": round(load_s, 2),
            "reports_per_s": round(reports_per_s, 1),
            "reports_per_burst": total,
            "reports_per_s_bursts": [round(r, 1) for r in rates],
            "route_p99_us": doc["routing"]["p99_us"],
            "route_p50_us_server": doc["routing"]["p50_us"],
            "route_samples_server": doc["routing"]["samples"],
            "route_p50_us_client": round(route_p50, 1),
            "echo_p50_us_client": round(echo_p50, 1),
            "route_vs_echo_ratio": round(route_p50 / echo_p50, 3),
            "raw_route_p50_us": round(statistics.median(raw_route_s) * 1e6, 1),
            "raw_echo_p50_us": round(statistics.median(raw_echo_s) * 1e6, 1),
            "raw_route_vs_echo_ratio": round(
                statistics.median(raw_route_s) / statistics.median(raw_echo_s), 3
            ),
            "rounds": rounds,
            "server_routing": doc["routing"],
        }
    finally:
        for node in locals().get("fleet", []):
            node.call.cancel()
        await raw.close(None)
        await http.aclose()
        await client.close()
        server.stop()


def _chan(client: FoghornClient) -> grpc.aio.Channel:
    return client._channel


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench foghorn", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--reports-per-node", type=int, default=20)
    parser.add_argument("--out", default=".bench/foghorn.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    started = time.perf_counter()
    result = asyncio.run(run(args.nodes, args.streams, args.rounds, args.reports_per_node))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    checks = {
        "route_p99_us": result["route_p99_us"] <= TARGETS["route_p99_us"],
        "route_vs_echo_ratio": result["route_vs_echo_ratio"] <= TARGETS["route_vs_echo_ratio"],
        "reports_per_s": result["reports_per_s"] >= TARGETS["reports_per_s"],
    }
    result["targets"] = TARGETS
    result["pass"] = checks
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"foghorn benchmark: {result['nodes']} nodes, {result['streams']} streams, "
          f"{result['wall_s']} s")  # fmt: skip
    print(f"{'metric':24} {'value':>12} {'target':>10}  ok")
    for name, target in TARGETS.items():
        op = "<=" if name != "reports_per_s" else ">="
        ok = "yes" if checks[name] else "NO"
        print(f"{name:24} {result[name]:>12} {op}{target:>8g}  {ok}")
    print(
        f"client p50: route {result['route_p50_us_client']} us, echo {result['echo_p50_us_client']}"
        f" us | raw grpc.aio baseline: route {result['raw_route_p50_us']} us, echo "
        f"{result['raw_echo_p50_us']} us (ratio {result['raw_route_vs_echo_ratio']})"
    )
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1
