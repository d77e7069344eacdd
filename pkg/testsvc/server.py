"""The test service: each call scripts its own failures, delays and pushback; attempts are counted.

Run in-process (``TestServicer`` + ``serve``) or as a process: ``testsvc --port 50051 --id a``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio

from pkg.common.grpcserver import GrpcServer, ServiceBinding, build_server
from pkg.common.shedding import SheddingPolicy
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc


@dataclass
class _KeyStats:
    attempts: int = 0
    cancelled: int = 0
    completed: int = 0
    deadlines: list[float] = field(default_factory=list)


class TestServicer(pb_grpc.TestServiceServicer):
    """Implements testsvc.v1.TestService; ``stats`` is readable in-process too."""

    def __init__(self, server_id: str = "testsvc", workers: int | None = None) -> None:
        self.server_id = server_id
        # Work holds one of ``workers`` slots (a connection pool, say) for its duration: the
        # server's capacity is workers / delay. None: unlimited.
        self._workers = asyncio.Semaphore(workers) if workers else None
        self.stats: dict[str, _KeyStats] = defaultdict(_KeyStats)
        self.total_attempts = 0

    async def _attempt(
        self, key: str, behavior: pb.Behavior, context: grpc.aio.ServicerContext[object, object]
    ) -> tuple[int, float]:
        stats = self.stats[key]
        stats.attempts += 1
        self.total_attempts += 1
        attempt = stats.attempts
        remaining = context.time_remaining()
        left = -1.0 if remaining is None else float(remaining)
        stats.deadlines.append(left)
        delay = behavior.delay_s
        if delay > 0 and (not behavior.delay_on_attempts or attempt in behavior.delay_on_attempts):
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                stats.cancelled += 1
                raise
        failing = behavior.fail_times < 0 or attempt <= behavior.fail_times
        if failing and behavior.fail_code:
            trailing: list[tuple[str, str]] = []
            if behavior.pushback_stop:
                trailing.append(("grpc-retry-pushback-ms", "-1"))
            elif behavior.pushback_ms > 0:
                trailing.append(("grpc-retry-pushback-ms", str(behavior.pushback_ms)))
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            await context.abort(
                grpc.StatusCode(_code(behavior.fail_code)),
                behavior.fail_details
                or f"scripted failure {attempt}/{behavior.fail_times} for key {key!r}",
            )
        stats.completed += 1
        return attempt, left

    async def Unary(
        self, request: pb.UnaryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UnaryReply:
        attempt, left = await self._attempt(request.key, request.behavior, context)
        return pb.UnaryReply(
            key=request.key,
            attempt=attempt,
            server_id=self.server_id,
            deadline_left_s=left,
            payload=request.payload,
        )

    async def Charge(
        self, request: pb.UnaryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UnaryReply:
        """Unary under another name: a method whose contract declares no idempotency."""
        return await self.Unary(request, context)

    async def Work(
        self, request: pb.UnaryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UnaryReply:
        """A unit of work lasting ``behavior.delay_s`` on one of the server's workers (no
        per-key bookkeeping: benchmarks send many thousands)."""
        if self._workers is None:
            await asyncio.sleep(request.behavior.delay_s)
        else:
            async with self._workers:
                await asyncio.sleep(request.behavior.delay_s)
        return pb.UnaryReply(key=request.key, attempt=1, server_id=self.server_id)

    async def ServerStream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.StreamReply]:
        attempt, _ = await self._attempt(request.key, request.behavior, context)
        for seq in range(request.count):
            if seq and request.interval_s > 0:
                await asyncio.sleep(request.interval_s)
            yield pb.StreamReply(
                key=request.key, seq=seq, attempt=attempt, server_id=self.server_id
            )

    async def BidiStream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.StreamReply]:
        first = True
        attempt = 0
        async for request in request_iterator:
            if first:
                attempt, _ = await self._attempt(request.key, request.behavior, context)
                first = False
            for seq in range(max(1, request.count)):
                yield pb.StreamReply(
                    key=request.key, seq=seq, attempt=attempt, server_id=self.server_id
                )

    async def GetStats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StatsReply:
        stats = self.stats.get(request.key, _KeyStats())
        return pb.StatsReply(
            attempts=stats.attempts,
            cancelled=stats.cancelled,
            completed=stats.completed,
            deadlines_left_s=stats.deadlines,
        )

    async def Echo(
        self, request: pb.EchoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EchoReply:
        return pb.EchoReply(payload=request.payload)


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    raise ValueError(f"unknown grpc status code {number}")


def build(
    servicer: TestServicer, port: int = 0, shedding: SheddingPolicy | None = None
) -> GrpcServer:
    return build_server(
        [
            ServiceBinding(
                pb_grpc.add_TestServiceServicer_to_server, servicer, "testsvc.v1.TestService"
            )
        ],
        port=port,
        shedding=shedding,
    )


async def serve(
    port: int, server_id: str, shedding: SheddingPolicy | None = None, workers: int | None = None
) -> None:
    server = build(TestServicer(server_id, workers), port, shedding)
    await server.start()
    print(f"testsvc {server_id} listening on 127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testsvc", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--id", default="testsvc")
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="load shedding: calls running per method"
    )
    parser.add_argument(
        "--max-queue", type=int, default=None, help="load shedding: calls waiting per method"
    )
    parser.add_argument(
        "--no-shedding", action="store_true", help="no bounded queue (a naive server)"
    )
    parser.add_argument("--workers", type=int, default=None, help="Work's worker slots")
    args = parser.parse_args(argv)
    shedding = SheddingPolicy(enabled=False) if args.no_shedding else None
    if args.max_in_flight is not None or args.max_queue is not None:
        default = SheddingPolicy()
        shedding = SheddingPolicy(
            max_in_flight=args.max_in_flight or default.max_in_flight,
            max_queue=default.max_queue if args.max_queue is None else args.max_queue,
        )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.id, shedding, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
