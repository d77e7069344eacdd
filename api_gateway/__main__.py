"""``bridge``: run one Bridge replica (GraphQL gateway) with uvicorn.

Configuration comes from BRIDGE_* environment variables (see ``api_gateway.config``); flags
``--port`` and ``--id`` override the port and replica id, handy for running two replicas.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from pkg.common.config import ConfigError
from pkg.common.logging import configure_logging
from pkg.common.telemetry import setup_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default $BRIDGE_HTTP_PORT or 8080)")
    parser.add_argument("--host", help="bind address (default $BRIDGE_HTTP_HOST or 127.0.0.1)")
    parser.add_argument("--id", dest="replica_id", help="replica id shown in /health")
    args = parser.parse_args(argv)

    configure_logging("bridge")
    setup_metrics("bridge")
    from api_gateway.config import load_config
    from api_gateway.server import build_replica

    overrides = {
        k: v
        for k, v in (
            ("http_port", args.port),
            ("http_host", args.host),
            ("replica_id", args.replica_id),
        )
        if v is not None
    }
    try:
        cfg = load_config(**overrides)
        replica = build_replica(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"bridge: bad configuration: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        replica.app,
        host=cfg.http_host,
        port=cfg.http_port,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
        # A WebSocket frame may be no larger than an HTTP body (close 1009 past it).
        ws_max_size=cfg.max_body_bytes,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
