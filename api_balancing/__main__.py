"""``foghorn``: run one Foghorn replica (config from FOGHORN_* environment variables).

FOGHORN_GRPC_PORT=18008 FOGHORN_HTTP_PORT=18080 PLATFORM_TOKENS=secret=ops:admin foghorn
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

import structlog

from api_balancing.config import FoghornConfig
from api_balancing.server import FoghornServer
from pkg.common.config import ConfigError, load
from pkg.common.logging import configure_logging
from pkg.common.telemetry import setup_metrics


async def _run(config: FoghornConfig) -> None:
    server = FoghornServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    tune_gc()
    print(
        f"foghorn {config.replica_id}: gRPC {server.grpc_target}, "
        f"HTTP http://{config.host}:{server.http_port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()


def tune_gc() -> None:
    """Make cyclic GC rare: Foghorn holds a large, long-lived heap (records of every node and
    stream) and allocates briskly per request, so default thresholds run full collections
    often enough to put multi-millisecond pauses into routing p99. Almost everything here is
    freed by reference counting; cycles are rare. Start-up objects are frozen out of the scans.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="foghorn", description="Foghorn: load balancer for media edge nodes"
    )
    parser.add_argument("--grpc-port", type=int, help="overrides FOGHORN_GRPC_PORT")
    parser.add_argument("--http-port", type=int, help="overrides FOGHORN_HTTP_PORT")
    parser.add_argument("--replica-id", help="overrides FOGHORN_REPLICA_ID")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("grpc_port", args.grpc_port),
            ("http_port", args.http_port),
            ("replica_id", args.replica_id),
        )
        if v is not None
    }
    configure_logging("foghorn")
    try:
        config = load(FoghornConfig, "FOGHORN", **overrides)
    except (ConfigError, ValueError) as exc:
        print(f"foghorn: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_metrics("foghorn")
    try:
        asyncio.run(_run(config))
    except OSError as exc:
        structlog.get_logger("foghorn").error("cannot start", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
