"""An anonymous routing flood that really offers its rate, and a legitimate viewer beside it.

No Python client offers 2,000 calls/s on two loaded cores (grpcio's asyncio client reached
~170/s), so the flood is ``h2load`` (nghttp2's C load generator, ``pkg.devstack.install``): one
process sends gRPC ``RouteViewer`` calls as raw HTTP/2 requests (POST, ``content-type:
application/grpc``, ``te: trailers``, a length-prefixed request body), another ``GET /play``
over HTTP/1.1, each at a fixed per-connection rate (``--rps``). While it runs, a viewer at
another source address (``127.0.0.2`` by default) asks Foghorn every ``interval_s``,
alternately over ``/play`` and over gRPC (raw gRPC over httpx's HTTP/2, bound to its address:
grpcio cannot choose its source address), and must be routed every time.

What is counted where it can be seen: ``started``/``done`` per second from h2load (offered and
answered); ``/play`` outcomes by HTTP status from h2load; gRPC outcomes, whose status h2load
does not read (trailers), from Foghorn's own counters read as operator before and after
(``foghorn_anonymous_limited_total`` minus the ``/play`` refusals).

Used by ``tests/security/test_anonymous_routing.py`` (a few seconds) and ``./dev bench flood``
(the 10 s figure of docs/security.md).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pkg.devstack.install import h2load_binary
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

VIEWER_ADDRESS = "127.0.0.2"  # loopback, but another client address than the flood's


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\0" + len(message).to_bytes(4, "big") + message


@dataclass
class LoadRun:
    """What one h2load process did: requests started (offered), answered, by HTTP status."""

    surface: str
    duration_s: float = 0.0
    started: int = 0
    done: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    output: str = ""

    @property
    def offered_per_s(self) -> float:
        return self.started / self.duration_s if self.duration_s else 0.0

    @property
    def answered_per_s(self) -> float:
        return self.done / self.duration_s if self.duration_s else 0.0


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load(surface: str, duration_s: float, output: str) -> LoadRun:
    """h2load's summary; a run that printed none (it could not connect) raises."""
    run = LoadRun(surface, duration_s, output=output)
    requests, status = _REQUESTS.search(output), _STATUS.search(output)
    if requests is None or status is None:
        raise RuntimeError(f"h2load ({surface}) printed no summary:\n{output[-2000:]}")
    run.started, run.done = int(requests[2]), int(requests[3])
    run.errored, run.timeout = int(requests[6]), int(requests[7])
    run.status = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True))
    return run


@dataclass
class Viewer:
    """The legitimate viewer's calls: outcome per call ("play 302", "grpc routed", ...)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    @property
    def routed(self) -> int:
        return self.outcomes["play 302"] + self.outcomes["grpc routed"]


async def _viewer(grpc_base: str, http_base: str, content_id: str, address: str,
                  until: float, interval_s: float, viewer: Viewer) -> None:  # fmt: skip
    body = grpc_frame(pb.ViewerRouteRequest(content_id=content_id).SerializeToString())
    grpc_headers = {"content-type": "application/grpc", "te": "trailers"}
    h1 = httpx.AsyncHTTPTransport(local_address=address)
    h2 = httpx.AsyncHTTPTransport(local_address=address, http1=False, http2=True)
    # Each viewer is its own naive client on its own address: no pkg.clients policy on purpose.
    http1 = httpx.AsyncClient(base_url=http_base, transport=h1, timeout=10)  # raw-client: adversary
    http2 = httpx.AsyncClient(base_url=grpc_base, transport=h2, timeout=10)  # raw-client: adversary
    async with http1 as http, http2 as grpc:
        turn = 0
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                if turn % 2 == 0:
                    reply = await http.get(f"/play/{content_id}")
                    outcome = f"play {reply.status_code}"
                    if reply.status_code != 302:
                        viewer.failures.append(f"/play {reply.status_code} {reply.text[:120]}")
                else:
                    reply = await grpc.post(
                        "/foghorn.v1.Routing/RouteViewer", content=body, headers=grpc_headers
                    )
                    outcome = _grpc_outcome(reply, viewer)
            except httpx.HTTPError as exc:
                outcome = f"error {type(exc).__name__}"
                viewer.failures.append(outcome)
            viewer.outcomes[outcome] += 1
            viewer.latencies_ms.append((time.monotonic() - started) * 1000)
            turn += 1
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


def _grpc_outcome(reply: httpx.Response, viewer: Viewer) -> str:
    """A routed answer is one message naming the best node; a refusal is trailers-only (the
    status in the response headers)."""
    status = reply.headers.get("grpc-status")
    if status not in (None, "0") or len(reply.content) < 5:
        viewer.failures.append(
            f"RouteViewer grpc-status {status} {reply.headers.get('grpc-message', '')[:120]}"
        )
        return f"grpc status {status}"
    out = pb.ViewerRouteResponse.FromString(reply.content[5:])
    if not out.best.node_id:
        viewer.failures.append("RouteViewer answered without a best node")
        return "grpc no node"
    return "grpc routed"


async def _counters(http_base: str, operator_token: str) -> dict[str, float]:
    """Foghorn's refused-anonymous and routed counts (summed over label sets)."""
    async with httpx.AsyncClient(base_url=http_base, timeout=10) as client:  # raw-client: adversary
        text = (
            await client.get("/metrics", headers={"authorization": f"Bearer {operator_token}"})
        ).text
    wanted = {
        "foghorn_anonymous_limited_total": "limited",
        'foghorn_routing_decisions_total{result="ok"': "routed",
    }
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        for prefix, key in wanted.items():
            name = prefix.split("{")[0]
            if line.startswith(name) and (prefix == name or 'result="ok"' in line):
                found[key] += float(line.rsplit(" ", 1)[1])
    return found


async def _h2load(surface: str, args: list[str], duration_s: float) -> LoadRun:
    proc = await asyncio.create_subprocess_exec(
        str(h2load_binary()), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return parse_h2load(surface, duration_s, out.decode(errors="replace"))


async def flood(grpc_port: int, http_port: int, *, operator_token: str, rate: float = 2000.0,
                duration_s: float = 10.0, content_id: str = "live-1",
                viewer_address: str = VIEWER_ADDRESS, viewer_interval_s: float = 0.1,
                connections: int = 20, host: str = "127.0.0.1") -> dict[str, Any]:  # fmt: skip
    """Flood ``host``'s Foghorn with ``rate`` anonymous calls/s (half gRPC RouteViewer, half
    /play) for ``duration_s`` while a viewer at ``viewer_address`` asks every
    ``viewer_interval_s``; the figures as a dict (see the module docstring)."""
    per_conn = max(1, round(rate / 2 / connections))
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        body = Path(tmp) / "route-viewer.bin"
        body.write_bytes(
            grpc_frame(pb.ViewerRouteRequest(content_id=content_id).SerializeToString())
        )
        seconds = f"{duration_s:g}"
        grpc_args = [
            "-c", str(connections), "-m", "100", "--rps", str(per_conn), "-D", seconds,
            "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://{host}:{grpc_port}/foghorn.v1.Routing/RouteViewer",
        ]  # fmt: skip
        # HTTP/1.1 has one request in flight per connection: five times the connections at a
        # fifth of the rate each, so a slow answer does not hold the offered rate back.
        play_args = [
            "--h1", "-c", str(connections * 5), "-m", "1", "--rps", str(max(1, per_conn // 5)),
            "-D", seconds, f"http://{host}:{http_port}/play/{content_id}",
        ]  # fmt: skip
        before = await _counters(f"http://{host}:{http_port}", operator_token)
        viewer = Viewer()
        until = time.monotonic() + duration_s
        grpc_run, play_run, _ = await asyncio.gather(
            _h2load("grpc", grpc_args, duration_s),
            _h2load("play", play_args, duration_s),
            _viewer(f"http://{host}:{grpc_port}", f"http://{host}:{http_port}", content_id,
                    viewer_address, until, viewer_interval_s, viewer),
        )  # fmt: skip
        after = await _counters(f"http://{host}:{http_port}", operator_token)
    limited = after["limited"] - before["limited"]
    play_limited = play_run.status["4xx"]
    grpc_limited = limited - play_limited
    lat = sorted(viewer.latencies_ms) or [0.0]
    return {
        "rate_aimed_per_s": rate,
        "duration_s": duration_s,
        "offered_per_s": round(grpc_run.offered_per_s + play_run.offered_per_s, 1),
        "answered_per_s": round(grpc_run.answered_per_s + play_run.answered_per_s, 1),
        "grpc": {
            "offered_per_s": round(grpc_run.offered_per_s, 1),
            "answered_per_s": round(grpc_run.answered_per_s, 1),
            "started": grpc_run.started,
            "done": grpc_run.done,
            "refused_rate_limited": int(grpc_limited),
            "routed": int(grpc_run.done - grpc_limited),
            "errored": grpc_run.errored,
        },
        "play": {
            "offered_per_s": round(play_run.offered_per_s, 1),
            "answered_per_s": round(play_run.answered_per_s, 1),
            "started": play_run.started,
            "done": play_run.done,
            "status": play_run.status,
            "errored": play_run.errored,
        },
        "foghorn_limited": int(limited),
        "foghorn_routed": int(after["routed"] - before["routed"]),
        "viewer": {
            "address": viewer_address,
            "calls": viewer.calls,
            "routed": viewer.routed,
            "outcomes": dict(viewer.outcomes),
            "failures": viewer.failures[:10],
            "p50_ms": round(statistics.median(lat), 1),
            "max_ms": round(lat[-1], 1),
        },
    }


def summary(result: dict[str, Any]) -> str:
    """A short printed table of ``flood``'s result."""
    g, p, v = result["grpc"], result["play"], result["viewer"]
    return "\n".join(
        [
            f"flood {result['rate_aimed_per_s']:.0f}/s aimed for {result['duration_s']:g} s: "
            f"offered {result['offered_per_s']:.0f}/s, answered {result['answered_per_s']:.0f}/s",
            f"  gRPC  offered {g['offered_per_s']:7.0f}/s answered {g['answered_per_s']:7.0f}/s "
            f"refused {g['refused_rate_limited']} routed {g['routed']} errored {g['errored']}",
            f"  /play offered {p['offered_per_s']:7.0f}/s answered {p['answered_per_s']:7.0f}/s "
            f"status {p['status']} errored {p['errored']}",
            f"  viewer {v['address']}: routed {v['routed']}/{v['calls']} "
            f"(p50 {v['p50_ms']} ms, max {v['max_ms']} ms) {v['outcomes']}",
        ]
    )


__all__ = ["VIEWER_ADDRESS", "LoadRun", "flood", "grpc_frame", "parse_h2load", "summary"]
