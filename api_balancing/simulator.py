"""``edge-sim``: a fleet of simulated edge nodes that hold control streams to Foghorn.

    edge-sim --foghorn 127.0.0.1:18008,127.0.0.1:18018 --nodes 50 --token secret

Nodes sit in cities around the world, carry a changing set of streams with changing viewer
counts (CPU, RAM and upload follow the viewers), report every few seconds and obey commands:
draining sheds viewers a bit every tick, maintenance drops them all, ``stop_sessions`` ends a
stream, ``drain`` sheds down to a target. A broken stream (Foghorn replica killed, restarted)
reconnects through ``pkg.clients.backoff`` with full jitter, to any of the given replicas.
Foghorn moves nodes without a failure: a ``Reconnect`` message (the replica stops, or hands
nodes to a replica that joined) is obeyed at once, and a ``Replicas`` message replaces the list
of replicas the fleet knows, so replicas can join and leave without restarting the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from pkg.clients.backoff import Backoff
from pkg.clients.discovery import dynamic_targets
from pkg.clients.foghorn import FoghornClient, parse_targets
from pkg.clients.targets import TargetList
from pkg.common.logging import configure_logging
from pkg.common.tls import add_tls_arguments, credentials_from_args
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

log = structlog.get_logger("edge-sim")
# How long a node avoids the replica that told it to move (Reconnect) when it picks one itself.
LEFT_AVOID_S = 10.0

# (city, region, latitude, longitude)
CITIES: list[tuple[str, str, float, float]] = [
    ("amsterdam", "eu-west", 52.37, 4.90),
    ("frankfurt", "eu-central", 50.11, 8.68),
    ("london", "eu-west", 51.51, -0.13),
    ("paris", "eu-west", 48.86, 2.35),
    ("madrid", "eu-south", 40.42, -3.70),
    ("milan", "eu-south", 45.46, 9.19),
    ("stockholm", "eu-north", 59.33, 18.07),
    ("warsaw", "eu-central", 52.23, 21.01),
    ("new-york", "us-east", 40.71, -74.01),
    ("ashburn", "us-east", 39.04, -77.49),
    ("chicago", "us-central", 41.88, -87.63),
    ("dallas", "us-central", 32.78, -96.80),
    ("los-angeles", "us-west", 34.05, -118.24),
    ("seattle", "us-west", 47.61, -122.33),
    ("toronto", "ca-east", 43.65, -79.38),
    ("mexico-city", "latam", 19.43, -99.13),
    ("sao-paulo", "latam", -23.55, -46.63),
    ("buenos-aires", "latam", -34.60, -58.38),
    ("tokyo", "ap-northeast", 35.68, 139.69),
    ("seoul", "ap-northeast", 37.57, 126.98),
    ("singapore", "ap-southeast", 1.35, 103.82),
    ("mumbai", "ap-south", 19.08, 72.88),
    ("sydney", "ap-southeast", -33.87, 151.21),
    ("hong-kong", "ap-east", 22.32, 114.17),
    ("johannesburg", "af-south", -26.20, 28.05),
    ("lagos", "af-west", 6.52, 3.38),
    ("cairo", "me-north", 30.04, 31.24),
    ("dubai", "me-south", 25.20, 55.27),
]
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]
PER_VIEWER_BPS = 2_500_000


@dataclass
class SimStream:
    stream_id: str
    tenant: str
    viewers: int
    inputs: int = 0


@dataclass
class SimNode:
    """One simulated edge node: identity, load model and command handling."""

    node_id: str
    city: str
    region: str
    lat: float
    lon: float
    capacity: int
    bandwidth_limit_bps: int
    ram_max: int
    roles: list[str]
    capabilities: list[str]
    base_url: str
    rng: random.Random
    catalog: list[tuple[str, str]]
    streams: dict[str, SimStream] = field(default_factory=dict)
    mode: int = pb.NODE_MODE_NORMAL
    mode_reason: str = ""
    drain_target: int | None = None
    connects: int = 0
    commands: int = 0

    def register(self) -> pb.Register:
        return pb.Register(
            node_id=self.node_id,
            roles=self.roles,
            capabilities=self.capabilities,
            base_url=self.base_url,
            location=pb.GeoPoint(latitude=self.lat, longitude=self.lon),
            capacity=self.capacity,
            region=self.region,
            # The operator's mode travels with the node: a Foghorn with a fresh store keeps it.
            mode=self.mode,  # type: ignore[arg-type]
            mode_reason=self.mode_reason,
        )

    @property
    def viewers(self) -> int:
        return sum(s.viewers for s in self.streams.values())

    def tick(self) -> None:
        """Move load one step: streams come and go, viewers random-walk, commands apply."""
        rng = self.rng
        if self.mode == pb.NODE_MODE_MAINTENANCE:
            self.streams.clear()
            return
        if self.mode == pb.NODE_MODE_DRAINING or self.drain_target is not None:
            target = self.drain_target or 0
            for s in list(self.streams.values()):
                s.viewers = max(0, int(s.viewers * 0.7))
                if s.viewers == 0 and not s.inputs:
                    del self.streams[s.stream_id]
            if self.drain_target is not None and self.viewers <= target:
                self.drain_target = None
            return
        if rng.random() < 0.3 and len(self.streams) < 40:
            sid, tenant = rng.choice(self.catalog)
            if sid not in self.streams:
                inputs = 1 if "ingest" in self.roles and rng.random() < 0.3 else 0
                self.streams[sid] = SimStream(sid, tenant, rng.randint(1, 50), inputs)
        for s in list(self.streams.values()):
            s.viewers = max(0, s.viewers + rng.randint(-8, 10))
            if s.viewers == 0 and rng.random() < 0.3:
                del self.streams[s.stream_id]
        room = self.capacity - self.viewers
        if room < 0:  # never report more viewers than capacity
            for s in self.streams.values():
                cut = min(s.viewers, -room)
                s.viewers -= cut
                room += cut

    def report(self) -> pb.LoadReport:
        load = self.viewers / max(1, self.capacity)
        cpu = min(100.0, max(0.0, 8 + 80 * load + self.rng.uniform(-3, 3)))
        ram_used = int(self.ram_max * min(0.95, 0.15 + 0.6 * load))
        upload = min(self.bandwidth_limit_bps, self.viewers * PER_VIEWER_BPS)
        return pb.LoadReport(
            cpu_percent=round(cpu, 2),
            ram_used_bytes=ram_used,
            ram_max_bytes=self.ram_max,
            upload_bps=upload,
            download_bps=sum(s.inputs for s in self.streams.values()) * 6_000_000
            + len(self.streams) * 3_000_000,
            bandwidth_limit_bps=self.bandwidth_limit_bps,
            streams=[
                pb.StreamLoad(
                    stream_id=s.stream_id,
                    tenant_id=s.tenant,
                    viewers=s.viewers,
                    inputs=s.inputs,
                    upload_bps=s.viewers * PER_VIEWER_BPS,
                )
                for s in self.streams.values()
            ],
        )

    def apply(self, command: pb.Command) -> pb.CommandAck:
        """Obey a command and say what was done."""
        self.commands += 1
        action = command.WhichOneof("action")
        if action == "set_mode":
            self.mode = command.set_mode.mode
            self.mode_reason = command.set_mode.reason[:256]
            name = pb.NodeMode.Name(self.mode).removeprefix("NODE_MODE_").lower()
            message = f"mode {name}"
            if self.mode == pb.NODE_MODE_NORMAL:
                self.drain_target = None
        elif action == "stop_sessions":
            stopped = self.streams.pop(command.stop_sessions.stream_id, None)
            message = f"stopped {stopped.viewers if stopped else 0} sessions"
        elif action == "drain":
            self.drain_target = max(0, command.drain.target_viewers)
            message = f"draining to {self.drain_target} viewers"
        else:
            return pb.CommandAck(request_id=command.request_id, ok=False, message="unknown command")
        return pb.CommandAck(request_id=command.request_id, ok=True, message=message)


def build_fleet(
    count: int, seed: int, streams: int = 200, base_port: int = 20000, host: str = "127.0.0.1"
) -> list[SimNode]:
    """``count`` nodes spread over the cities (deterministic for a seed); their media URLs
    (what viewers are redirected to) name ``host``."""
    rng = random.Random(seed)
    catalog = [(f"live-{i:04d}", TENANTS[i % len(TENANTS)]) for i in range(max(1, streams))]
    nodes = []
    for i in range(count):
        city, region, lat, lon = CITIES[i % len(CITIES)]
        ingest = i % 5 == 0
        caps = ["hls", "dash", "webrtc"] + (["llhls"] if i % 3 == 0 else [])
        if ingest:
            caps += ["rtmp", "srt", "whip"]
        nodes.append(
            SimNode(
                node_id=f"edge-{city}-{i:03d}",
                city=city,
                region=region,
                lat=round(max(-90.0, min(90.0, lat + rng.uniform(-0.3, 0.3))), 4),
                lon=round(max(-180.0, min(180.0, lon + rng.uniform(-0.3, 0.3))), 4),
                capacity=rng.choice([2000, 3000, 5000]),
                bandwidth_limit_bps=rng.choice([5, 10, 20]) * 1_000_000_000,
                ram_max=rng.choice([16, 32, 64]) * 2**30,
                roles=["edge", "ingest"] if ingest else ["edge"],
                capabilities=caps,
                base_url=f"http://{host}:{base_port + i}",
                rng=random.Random(seed * 1000 + i),
                catalog=catalog,
            )
        )
    return nodes


def read_targets(path: Path) -> list[str]:
    """Replica addresses from a file: ``host:port`` per line (or comma-separated)."""
    return parse_targets(path.read_text().replace("\n", ","))


class Replicas:
    """The Foghorn replicas a fleet knows and one client (channel) per replica.

    Two sources, both changing without a restart: the configured addresses (``--foghorn``, or
    the file given with ``--foghorn-file``, re-read when it changes: what an operator edits when
    a replica that is not in the registry joins or leaves, e.g. an in-memory one during a
    rollout) and the list Foghorn announces on the control stream (``Replicas``: every HA
    replica of the cluster). Announced replicas come first; configured ones are kept as a
    fallback. A node's stream goes to one replica at a time: one channel per address keeps a
    replica's failures (and its circuit breaker) to itself, so a node moves on at once.
    """

    def __init__(
        self,
        addresses: list[str],
        token: str | None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.configured = list(addresses)
        self.credentials = credentials  # TLS to every replica (--tls-ca ...)
        self.announced: list[str] = []
        self.addresses = list(addresses)
        self.token = token
        self._clients: dict[str, FoghornClient] = {}
        # Where the configured list comes from when it changes by itself (dns:///, file:).
        self.source: TargetList | None = None

    def _merge(self) -> None:
        merged = [*self.announced, *(a for a in self.configured if a not in self.announced)]
        if merged != self.addresses:
            log.info("foghorn replicas", addresses=merged, was=self.addresses)
            self.addresses = merged

    def update(self, announced: list[str]) -> None:
        """Foghorn's list (``Replicas``); an empty one (the replica knows none) is ignored."""
        if announced:
            self.announced = list(announced)
            self._merge()

    def configure(self, addresses: list[str]) -> None:
        """The operator's list (the watched file)."""
        if addresses:
            self.configured = list(addresses)
            self._merge()

    def failed(self) -> None:
        """A node's stream to a replica failed: a configured DNS name is re-resolved soon (at
        most once a second however many nodes fail)."""
        if self.source is not None:
            self.source.refresh_soon()

    def client(self, address: str) -> FoghornClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = FoghornClient(
                [address], token=self.token, credentials=self.credentials
            )
        return client

    async def watch_file(self, path: Path, every_s: float = 1.0) -> None:
        """Re-read ``path`` (``host:port`` per line or comma-separated) whenever it changes."""
        seen: float | None = None
        while True:
            try:
                seen = await asyncio.to_thread(self._reread, path, seen)
            except (OSError, ValueError) as exc:
                log.warning("replica file not read", path=str(path), error=str(exc))
            await asyncio.sleep(every_s)

    def _reread(self, path: Path, seen: float | None) -> float:
        mtime = path.stat().st_mtime
        if mtime != seen:
            self.configure(read_targets(path))
        return mtime

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class NodeRunner:
    """Keeps one simulated node connected: register, report on a timer, answer commands.

    Which replica: the targets of the last ``Reconnect`` Foghorn sent (at once, no backoff),
    else the known replicas in turn starting from the node's own slot; a replica that refused
    or broke the stream is skipped on the next try (after the backoff, reset by each
    registration).
    """

    def __init__(
        self,
        node: SimNode,
        replicas: Replicas | FoghornClient,
        interval_s: float,
        backoff: Backoff | None = None,
        slot: int = 0,
    ) -> None:
        self.node = node
        if isinstance(replicas, FoghornClient):  # a fixed client (tests, one channel)
            self.replicas: Replicas | None = None
            self._fixed: FoghornClient | None = replicas
        else:
            self.replicas, self._fixed = replicas, None
        self.interval_s = interval_s
        self.backoff = backoff or Backoff(base=0.2, cap=5.0)
        self.connected = asyncio.Event()
        self.rejections: list[pb.ReportRejected] = []
        self.slot = slot
        self.address = ""  # the replica of the current (or last) stream
        self.moved = 0  # Reconnect messages obeyed
        self._moving_to: list[str] = []
        self._failed: set[str] = set()
        # A replica that told this node to move (it is stopping, or it holds more than its
        # share) is not picked again for a while, unless no other replica is left to try.
        self._left: dict[str, float] = {}

    def _pick(self) -> str:
        if self.replicas is None:
            return ""
        known = self.replicas.addresses
        for target in self._moving_to:
            if target not in self._failed:
                return target
        order = [known[(self.slot + i) % len(known)] for i in range(len(known))]
        now = time.monotonic()
        for address in order:
            if address not in self._failed and self._left.get(address, 0.0) <= now:
                return address
        for address in order:
            if address not in self._failed:
                return address
        self._failed.clear()
        return order[0]

    async def run(self) -> None:
        """Forever: connect, serve the stream until it breaks or Foghorn moves it, reconnect."""
        # Nodes boot at slightly different moments (spreads the registrations).
        await asyncio.sleep(self.node.rng.uniform(0.0, min(1.0, self.interval_s)))
        while True:
            self.address = self._pick()
            moved = False
            try:
                moved = await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                log.info("control stream ended", node_id=self.node.node_id, code=str(code),
                         replica=self.address)  # fmt: skip
            except Exception as exc:
                log.warning("control stream failed", node_id=self.node.node_id, error=repr(exc),
                            replica=self.address)  # fmt: skip
            self.connected.clear()
            if moved:
                continue  # told where to go: no backoff
            self._moving_to = []
            if self.address:
                self._failed.add(self.address)
                if self.replicas is not None:
                    self.replicas.failed()
            # Reset at each registration: the first retry (to the next replica) waits at most
            # 0.2 s, which spreads a fleet whose replica died; repeated failures wait longer.
            await self.backoff.wait()

    async def _session(self) -> bool:
        """One control stream; True when Foghorn told the node to move (reconnect at once)."""
        outbox: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
        outbox.put_nowait(pb.NodeMessage(register=self.node.register()))

        async def messages() -> AsyncIterator[pb.NodeMessage]:
            while True:
                yield await outbox.get()

        if self._fixed is not None:
            client = self._fixed
        else:
            assert self.replicas is not None
            client = self.replicas.client(self.address)
        call = client.connect(messages())
        reporter: asyncio.Task[None] | None = None
        try:
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "registered":
                    self.node.connects += 1
                    self.node.mode = msg.registered.mode or pb.NODE_MODE_NORMAL
                    self.node.mode_reason = msg.registered.mode_reason
                    self.backoff.reset()
                    self._failed.clear()
                    self._moving_to = []
                    self.connected.set()
                    outbox.put_nowait(pb.NodeMessage(report=self.node.report()))
                    if reporter is None:
                        reporter = asyncio.create_task(self._report_loop(outbox))
                elif kind == "command":
                    ack = self.node.apply(msg.command)
                    outbox.put_nowait(pb.NodeMessage(ack=ack))
                    # Report at once so Foghorn sees the effect without waiting a tick.
                    self.node.tick()
                    outbox.put_nowait(pb.NodeMessage(report=self.node.report()))
                elif kind == "rejected":
                    self.rejections.append(msg.rejected)
                    log.warning(
                        "report rejected", node_id=self.node.node_id, why=msg.rejected.message
                    )
                elif kind == "replicas":
                    if self.replicas is not None:
                        self.replicas.update(list(msg.replicas.addresses))
                elif kind == "reconnect":
                    # GOAWAY-like: move now, to the targets given (else any other replica).
                    self.moved += 1
                    self._moving_to = list(msg.reconnect.targets)
                    self._failed = {self.address} if self.address else set()
                    if self.address:
                        self._left[self.address] = time.monotonic() + LEFT_AVOID_S
                    log.info("moving to another replica", node_id=self.node.node_id,
                             reason=msg.reconnect.reason, targets=self._moving_to)  # fmt: skip
                    return True
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            call.cancel()
        return False

    async def _report_loop(self, outbox: asyncio.Queue[pb.NodeMessage]) -> None:
        rng = self.node.rng
        await asyncio.sleep(rng.uniform(0, self.interval_s))  # spread nodes over the interval
        while True:
            self.node.tick()
            outbox.put_nowait(pb.NodeMessage(report=self.node.report()))
            await asyncio.sleep(self.interval_s * rng.uniform(0.9, 1.1))


def configured_replicas(
    spec: str | TargetList, token: str | None, credentials: grpc.ChannelCredentials | None = None
) -> Replicas:
    """The fleet's replicas from ``--foghorn``: fixed addresses, or a list that changes by
    itself ("dns:///name:port": every address of the name, re-resolved every 5 s and soon
    after a node's stream fails; "file:/path"; a ``TargetList``) through pkg.clients' own
    sources. Call inside the event loop (the source refreshes on it)."""
    source = dynamic_targets(spec)
    configured = list(source.addresses) if source else parse_targets(spec)
    replicas = Replicas(configured, token, credentials)
    if source is not None:
        replicas.source = source
        source.subscribe(lambda found: replicas.configure(list(found)))
        source.acquire()
        source.start()
    return replicas


async def run_fleet(args: argparse.Namespace) -> int:
    credentials = credentials_from_args(args)
    source: TargetList | None = None
    if args.foghorn_file:
        path = Path(args.foghorn_file)
        replicas = Replicas(read_targets(path), args.token or None, credentials)
        watcher: asyncio.Task[None] | None = asyncio.create_task(replicas.watch_file(path))
    else:
        replicas = configured_replicas(args.foghorn, args.token or None, credentials)
        source = replicas.source
        watcher = None
    nodes = build_fleet(args.nodes, args.seed, args.streams, args.base_port, args.media_host)
    runners = [NodeRunner(n, replicas, args.interval, slot=i) for i, n in enumerate(nodes)]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"edge-sim: {len(nodes)} nodes -> {', '.join(replicas.addresses)} "
        f"(report every {args.interval:g} s)",
        file=sys.stderr,
        flush=True,
    )
    status = asyncio.create_task(_status_loop(runners, args.status_every))
    await stop.wait()
    for task in [*tasks, status, *([watcher] if watcher else [])]:
        task.cancel()
    await asyncio.gather(*tasks, status, *([watcher] if watcher else []), return_exceptions=True)
    if source is not None:
        await source.close()
    await replicas.close()
    return 0


async def _status_loop(runners: list[NodeRunner], every: float) -> None:
    if every <= 0:
        return
    while True:
        await asyncio.sleep(every)
        up = sum(1 for r in runners if r.connected.is_set())
        viewers = sum(r.node.viewers for r in runners)
        log.info("fleet", connected=up, nodes=len(runners), viewers=viewers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-sim", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--foghorn",
        help="host:port[,host:port] of Foghorn replicas, or dns:///name:port (every address "
        "of the name, re-resolved every 5 s and after failures)",
    )
    where.add_argument(
        "--foghorn-file",
        help="a file listing the Foghorn replicas (host:port per line), re-read when it changes",
    )
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--token", default="", help="bearer token (default $EDGE_SIM_TOKEN)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    parser.add_argument("--streams", type=int, default=200, help="size of the content catalog")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=20000, help="first node's URL port")
    parser.add_argument("--media-host", default="127.0.0.1", help="host in the nodes' URLs")
    parser.add_argument("--status-every", type=float, default=30.0)
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.nodes > 100_000:
        parser.error("--nodes must be in 1..100000")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if not args.token:
        import os

        args.token = os.environ.get("EDGE_SIM_TOKEN", "")
    configure_logging("edge-sim")
    try:
        return asyncio.run(run_fleet(args))
    except ValueError as exc:
        print(f"edge-sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
