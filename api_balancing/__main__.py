"""``foghorn``: run one Foghorn replica (config from FOGHORN_* environment variables).

FOGHORN_GRPC_PORT=18008 FOGHORN_HTTP_PORT=18080 PLATFORM_TOKENS=secret=ops:operator foghorn
"""

from __future__ import annotations

import argparse
import gc
import sys

from api_balancing.config import load_config
from api_balancing.server import FoghornApp
from pkg.common.app import run_main


def tune_gc() -> None:
    """Make cyclic GC rare: Foghorn holds a large, long-lived heap (records of every node and
    stream) and allocates briskly per request, so default thresholds run full collections
    often enough to put multi-millisecond pauses into routing p99. Almost everything here is
    freed by reference counting; cycles are rare. Start-up objects are frozen out of the scans.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _started(app: FoghornApp) -> None:
    tune_gc()
    print(
        f"foghorn {app.config.replica_id}: gRPC {app.grpc_target}, "
        f"HTTP {app.http.scheme if app.http else 'http'}://{app.config.host}:{app.http_port}, "
        f"transport {app.config.tls.describe()}",
        file=sys.stderr,
        flush=True,
    )


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
    return run_main(
        "foghorn",
        lambda: load_config(**overrides),
        FoghornApp,
        _started,
        event_loop=lambda config: config.event_loop,
    )


if __name__ == "__main__":
    sys.exit(main())
