"""``bridge``: run one Bridge replica (GraphQL gateway).

Configuration comes from BRIDGE_* environment variables (see ``api_gateway.config``); flags
``--port``, ``--host`` and ``--id`` override the port, bind address and replica id, handy for
running two replicas.
"""

from __future__ import annotations

import argparse
import sys

from api_gateway.config import load_config
from api_gateway.server import BridgeApp
from pkg.common.app import run_main


def _started(app: BridgeApp) -> None:
    print(
        f"bridge {app.config.replica_id}: HTTP "
        f"{'https' if app.config.tls.serves_tls else 'http'}://{app.config.http_host}:"
        f"{app.http_port}/graphql, transport {app.config.tls.describe()}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default $BRIDGE_HTTP_PORT or 8080)")
    parser.add_argument("--host", help="bind address (default $BRIDGE_HTTP_HOST or 127.0.0.1)")
    parser.add_argument("--id", dest="replica_id", help="replica id shown in /health")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("http_port", args.port),
            ("http_host", args.host),
            ("replica_id", args.replica_id),
        )
        if v is not None
    }
    return run_main(
        "bridge",
        lambda: load_config(**overrides),
        BridgeApp,
        _started,
        event_loop=lambda config: config.event_loop,
    )


if __name__ == "__main__":
    sys.exit(main())
