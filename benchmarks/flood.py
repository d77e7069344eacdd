"""An anonymous flood against Foghorn's public routing: ``./dev bench flood`` -> .bench/flood.json.

One real ``foghorn`` process with its default limits and three nodes reporting every second; for
``--seconds`` (10), ``h2load`` offers ``--rate`` (2,000) anonymous calls/s from 127.0.0.1, half
gRPC ``RouteViewer`` and half ``GET /play`` (``devtools.flood``), while a legitimate viewer at
127.0.0.2 asks every 0.1 s, alternately over ``/play`` and gRPC. Recorded: the offered and
answered rates per surface, the refusals (Foghorn's own count and /play's statuses), the
viewer's calls, how many were routed (the claim: all of them) and its latency, Foghorn's CPU
over the flood and the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

from devtools.flood import VIEWER_ADDRESS, flood, summary
from pkg.devstack.servers import CommandProcess, free_port
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from pkg.proto.foghorn.v1 import foghorn_pb2_grpc as pb_grpc

OPERATOR = "flood-operator"
NODE = "flood-node"
TOKENS = f"{OPERATOR}=ops:operator,{NODE}=edge:node;nodes=flood-*;tenants=acme"


async def _node(channel: grpc.aio.Channel, index: int, stop: asyncio.Event) -> None:
    """A node that registers and reports every second until ``stop``."""

    async def messages() -> AsyncIterator[pb.NodeMessage]:
        yield pb.NodeMessage(
            register=pb.Register(
                node_id=f"flood-{index}", roles=["edge"], capabilities=["hls"],
                base_url=f"http://flood-{index}.example:8080",
                location=pb.GeoPoint(latitude=48.85, longitude=2.35), capacity=1000,
            )
        )  # fmt: skip
        while not stop.is_set():
            yield pb.NodeMessage(
                report=pb.LoadReport(
                    cpu_percent=10.0 + index, ram_used_bytes=1 << 30, ram_max_bytes=8 << 30,
                    upload_bps=1_000_000, bandwidth_limit_bps=10_000_000_000,
                    streams=[pb.StreamLoad(stream_id="live-1", tenant_id="acme", viewers=10)],
                )
            )  # fmt: skip
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    call = pb_grpc.NodeControlStub(channel).Connect(
        messages(), metadata=(("authorization", f"Bearer {NODE}"),)
    )
    async for _ in call:
        pass


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(rate: float, seconds: float, viewer_interval_s: float) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="flood-bench-"))
    grpc_port, http_port = free_port(), free_port()
    server = CommandProcess(
        "foghorn",
        [sys.executable, "-m", "api_balancing", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port)],
        run_dir=run_dir, port=grpc_port,
        env={"PLATFORM_TOKENS": TOKENS, "FOGHORN_REPLICA_ID": "flood", "LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    server.start()
    stop = asyncio.Event()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")  # raw-client: adversary
    nodes = [asyncio.create_task(_node(channel, i, stop)) for i in range(3)]
    try:
        admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}")  # raw-client: adversary
        async with admin as client:
            for _ in range(100):
                reply = await client.get("/nodes", headers={"authorization": f"Bearer {OPERATOR}"})
                rows = reply.json()["nodes"]
                if len(rows) == 3 and all(r["cpu_percent"] is not None for r in rows):
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the three nodes did not report within 10 s")
        assert server.proc is not None
        cpu = _cpu_s(server.proc.pid)
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        result = await flood(
            grpc_port, http_port, operator_token=OPERATOR, rate=rate, duration_s=seconds,
            viewer_address=VIEWER_ADDRESS, viewer_interval_s=viewer_interval_s,
        )  # fmt: skip
        result["foghorn_cpu_s"] = round(_cpu_s(server.proc.pid) - cpu, 2)
        result["wall_s"] = round(time.monotonic() - started, 2)
        result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        result["nodes"] = 3
        viewer = result["viewer"]
        result["viewer_routed_every_time"] = 0 < viewer["calls"] == viewer["routed"]
        return result
    finally:
        stop.set()
        for task in nodes:
            task.cancel()
        await asyncio.gather(*nodes, return_exceptions=True)
        await channel.close(None)
        server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench flood", description=__doc__)
    parser.add_argument("--rate", type=float, default=2000.0, help="calls/s offered")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--viewer-interval", type=float, default=0.1)
    parser.add_argument("--out", default=".bench/flood.json")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.rate, args.seconds, args.viewer_interval))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"foghorn CPU {result['foghorn_cpu_s']} s over {result['wall_s']} s, "
          f"load {result['load_average']} -> {out}")  # fmt: skip
    return 0 if result["viewer_routed_every_time"] else 1
