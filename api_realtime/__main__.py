"""``signalman``: run one Signalman replica (config from ``SIGNALMAN_*``, tokens from
``PLATFORM_TOKENS``). With no Kafka/Redis/PostgreSQL configured it runs embedded, in memory."""

from __future__ import annotations

import argparse
import sys

from api_realtime.config import load_config
from api_realtime.server import SignalmanApp
from pkg.common.app import run_main
from pkg.common.heap import HeapKeeper, tune_gc


def _started(app: SignalmanApp) -> None:
    # Everything built so far (modules, clients, protobuf descriptors) lives as long as the
    # process: keep it out of the collector's full passes, which took ~70 ms on a busy replica
    # and stalled delivery for that long. So do the subscriber sessions, made at run time: a
    # full pass over 5,000 of them took 0.9 s (pkg.common.heap), so they are frozen too once
    # a burst of them has connected.
    tune_gc()
    keeper = HeapKeeper(lambda: len(app.hub.sessions))
    app.lifecycle.spawn(keeper.run(), "heap-keeper")
    print(
        f"signalman {app.config.replica_id}: gRPC {app.grpc_target}, "
        f"HTTP {app.http.scheme if app.http else 'http'}://{app.config.host}:{app.http_port}, "
        f"transport {app.config.tls.describe()}",
        file=sys.stderr,
        flush=True,
    )


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
        for k, v in (
            ("grpc_port", args.grpc_port),
            ("http_port", args.http_port),
            ("replica_id", args.replica_id),
        )
        if v is not None
    }
    return run_main("signalman", lambda: load_config(**overrides), SignalmanApp, _started)


if __name__ == "__main__":
    sys.exit(main())
