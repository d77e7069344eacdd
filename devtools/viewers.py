"""Steady viewer traffic for ``./dev up``: routing through Foghorn and through Bridge.

Without viewers the status view of a fresh platform shows no routing at all. This process asks
for the best node at a fixed, low rate, straight to Foghorn (both replicas given to
``pkg.clients.foghorn``) and through Bridge's GraphQL ``route`` query, and prints one line per
interval (requests, failures, p99). It keeps only the current interval's samples, so it can run
for days. ``./dev up --viewers 0`` turns it off.

    python -m devtools.viewers --foghorn 127.0.0.1:18008,127.0.0.1:18009 \\
        --bridge http://127.0.0.1:8080/graphql --rate 5

Bridge needs a JWT: the process mints its own (and renews it) from ``BRIDGE_JWT_HS256_SECRET``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

from devtools.drill_traffic import BridgeViewers, FoghornViewers, Recorder, percentile

TOKEN_TTL_S = 3600.0


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devtools.viewers", description=__doc__)
    p.add_argument("--foghorn", type=_csv, default=[], help="Foghorn gRPC addresses, a,b")
    p.add_argument("--bridge", type=_csv, default=[], help="Bridge GraphQL URLs, a,b")
    p.add_argument("--rate", type=float, default=5.0, help="routing requests/s per target kind")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between report lines")
    return p


def summary(recorder: Recorder) -> str:
    """One interval of one traffic source, then forget its samples (bounded memory)."""
    samples, recorder.samples = recorder.samples, []
    failed = [s for s in samples if not s.ok]
    p99_ms = percentile([s.latency for s in samples], 0.99) * 1000
    line = f"{recorder.name}: {len(samples)} routed, {len(failed)} failed, p99 {p99_ms:.1f} ms"
    if failed:
        line += f" (last error: {failed[-1].error[:120]})"
    return line


def _bridge_token() -> str:
    from api_gateway.devtoken import mint

    secret = os.environ.get("BRIDGE_JWT_HS256_SECRET", "")
    if not secret:
        raise SystemExit("--bridge needs BRIDGE_JWT_HS256_SECRET in the environment")
    return mint(secret, "viewers", ["viewer"], "platform", "bridge", TOKEN_TTL_S)


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.interval <= 0:
        raise SystemExit("--rate and --interval must be positive")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sources: list[FoghornViewers | BridgeViewers] = []
    if args.foghorn:
        sources.append(FoghornViewers(args.foghorn, args.rate))
    bridge: BridgeViewers | None = None
    minted_at = time.monotonic()
    if args.bridge:
        bridge = BridgeViewers(args.bridge, _bridge_token(), args.rate)
        sources.append(bridge)
    if not sources:
        raise SystemExit("nothing to do: give --foghorn and/or --bridge")
    for source in sources:
        source.start()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            print(" | ".join(summary(s.recorder) for s in sources), flush=True)
            if bridge is not None and time.monotonic() - minted_at > TOKEN_TTL_S / 2:
                bridge.headers = {"authorization": f"Bearer {_bridge_token()}"}
                minted_at = time.monotonic()
    finally:
        for source in sources:
            await source.stop()
            await source.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
