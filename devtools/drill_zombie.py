"""The "zombie" probe of the pause drill: a node whose owner replica freezes past its TTLs.

Sequence (what a real node does when its Foghorn replica stops answering):

1. the probe node registers on the victim replica only and reports (``cpu=11``);
2. the victim is paused (SIGSTOP) longer than the ownership TTL;
3. the node "reconnects" to the survivor, registers there and reports ``cpu=22``;
4. one more report (``cpu=99``) is queued on the old stream: the zombie will process it late;
5. the victim resumes. Expected: the old stream ends with ABORTED, the victim counts a fenced
   write or a takeover, and both replicas keep the survivor's data (``cpu=22``, owner survivor).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from devtools.devtls import grpc_credentials
from pkg.clients import Policy, RetryPolicy
from pkg.clients.foghorn import ControlStream, FoghornClient
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

ADMIN_POLICY = Policy(timeout=3.0, retry=RetryPolicy(max_attempts=3, attempt_timeout=1.0))
CPU_BEFORE, CPU_AFTER, CPU_LATE = 11.0, 22.0, 99.0


class ProbeStream(ControlStream):
    """A hand-driven node control stream."""

    async def register(self, identity: pb.Register, wait_s: float = 10.0) -> None:
        self.send(pb.NodeMessage(register=identity))
        reply = await asyncio.wait_for(self.call.read(), wait_s)
        if not isinstance(reply, pb.ControlMessage) or reply.WhichOneof("msg") != "registered":
            raise RuntimeError(f"probe node was not registered: {reply!r}")

    def report(self, cpu: float) -> None:
        self.send(pb.NodeMessage(report=report(cpu)))

    async def status(self, wait_s: float) -> grpc.StatusCode | None:
        """The stream's final status (None if it is still open after ``wait_s``)."""
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    msg = await self.call.read()
                    if not isinstance(msg, pb.ControlMessage):  # grpc.aio.EOF
                        break
            code: grpc.StatusCode = await self.call.code()
            return code
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.end()
        self.call.cancel()


def identity(node_id: str) -> pb.Register:
    return pb.Register(
        node_id=node_id,
        roles=["edge"],
        capabilities=["hls"],
        base_url=f"http://{node_id}.drill.invalid:8080",
        capacity=10,
        region="drill",
        location=pb.GeoPoint(latitude=-60.0, longitude=-60.0),  # far away: never the best
    )


def report(cpu: float) -> pb.LoadReport:
    return pb.LoadReport(
        cpu_percent=cpu,
        ram_used_bytes=1 << 30,
        ram_max_bytes=8 << 30,
        upload_bps=1_000,
        download_bps=1_000,
        bandwidth_limit_bps=10_000_000,
    )


async def poll(
    predicate: Callable[[], Awaitable[bool]], wait_s: float, interval: float = 0.2
) -> bool:
    """Poll an async predicate until true or ``wait_s`` passed; exceptions count as false."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await predicate():
                return True
        await asyncio.sleep(interval)
    return False


class ZombieProbe:
    """Drives the sequence above against two replica addresses; ``facts`` holds what it saw."""

    def __init__(
        self, victim: str, survivor: str, token: str, node_token: str, run_id: str
    ) -> None:
        self.node_id = f"drill-zombie-{run_id}"
        # Admin reads with the operator's credential; the probe node's streams with a node's.
        creds = grpc_credentials()
        self.victim = FoghornClient([victim], token=token, policy=ADMIN_POLICY, credentials=creds)
        self.survivor = FoghornClient(
            [survivor], token=token, policy=ADMIN_POLICY, credentials=creds
        )
        self.victim_node = FoghornClient(
            [victim], token=node_token, policy=ADMIN_POLICY, credentials=creds
        )
        self.survivor_node = FoghornClient(
            [survivor], token=node_token, policy=ADMIN_POLICY, credentials=creds
        )
        self.old: ProbeStream | None = None
        self.new: ProbeStream | None = None
        self.facts: dict[str, object] = {}

    async def before_pause(self, victim_replica: str) -> None:
        self.old = ProbeStream(self.victim_node)
        await self.old.register(identity(self.node_id))
        self.old.report(CPU_BEFORE)

        async def owned_by_victim() -> bool:
            node = await self.victim.get_node(self.node_id)
            return node.health.owner_replica == victim_replica

        self.facts["owned_by_victim_before"] = await poll(owned_by_victim, 10)

    async def during_pause(self) -> None:
        """The node reconnects to the survivor (after the victim's ownership expired)."""
        self.new = ProbeStream(self.survivor_node)
        await self.new.register(identity(self.node_id))
        self.new.report(CPU_AFTER)

        async def survivor_has_new_data() -> bool:
            node = await self.survivor.get_node(self.node_id)
            return node.last_report.cpu_percent == CPU_AFTER

        self.facts["survivor_took_over"] = await poll(survivor_has_new_data, 10)
        assert self.old is not None
        self.old.report(CPU_LATE)  # queued for the zombie: it will try to write this late

    async def after_resume(self, survivor_replica: str, wait_s: float) -> None:
        assert self.old is not None
        code = await self.old.status(wait_s)
        self.facts["zombie_stream_status"] = code.name if code else "still open"

        async def converged(client: FoghornClient) -> bool:
            node = await client.get_node(self.node_id)
            return (
                node.last_report.cpu_percent == CPU_AFTER
                and node.health.owner_replica == survivor_replica
            )

        self.facts["survivor_data_kept_on_survivor"] = await poll(
            lambda: converged(self.survivor), 10
        )
        self.facts["survivor_data_kept_on_victim"] = await poll(lambda: converged(self.victim), 10)

    async def close(self) -> None:
        for stream in (self.old, self.new):
            if stream is not None:
                await stream.close()
        for client in (self.victim, self.survivor, self.victim_node, self.survivor_node):
            await client.close()
