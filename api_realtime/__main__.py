"""``signalman``: run one Signalman replica (config from ``SIGNALMAN_*``, tokens from
``PLATFORM_TOKENS``). With no Kafka/Redis/PostgreSQL configured it runs embedded, in memory."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

import structlog

from api_realtime.config import SignalmanConfig, load_config
from api_realtime.server import SignalmanApp
from pkg.common.config import ConfigError
from pkg.common.logging import configure_logging
from pkg.common.telemetry import setup_metrics

log = structlog.get_logger("signalman")


async def serve(cfg: SignalmanConfig) -> None:
    app = SignalmanApp(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    # Everything built so far (modules, clients, protobuf descriptors) lives as long as the
    # process: keep it out of the collector's full passes, which took ~70 ms on a busy replica
    # and stalled delivery for that long.
    gc.freeze()
    await stop.wait()
    log.info("signalman_stopping", replica=cfg.replica_id)
    await app.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="signalman",
        description="Signalman realtime hub replica. Configure with SIGNALMAN_* variables "
        "(GRPC_PORT, HTTP_PORT, KAFKA_BOOTSTRAP, REDIS_URL, POSTGRES_DSN, REPLICA_ID, ...).",
    )
    parser.add_argument("--grpc-port", type=int, help="overrides SIGNALMAN_GRPC_PORT")
    parser.add_argument("--http-port", type=int, help="overrides SIGNALMAN_HTTP_PORT")
    parser.add_argument("--replica-id", help="overrides SIGNALMAN_REPLICA_ID")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "grpc_port": args.grpc_port,
            "http_port": args.http_port,
            "replica_id": args.replica_id,
        }.items()
        if v is not None
    }
    configure_logging("signalman")
    try:
        cfg = load_config(**overrides)
    except (ConfigError, ValueError) as exc:
        print(f"signalman: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_metrics("signalman")
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
