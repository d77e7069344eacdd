"""``signalman-tail``: follow a tenant's events from the command line.

    signalman-tail --targets 127.0.0.1:18070,127.0.0.1:18071 --token TOKEN streams routing

The tenant is the token's. Reconnects and resumes across the listed replicas on its own (the
typed client in ``pkg.clients.signalman``); prints one line per event, and says so loudly when
history did not reach back far enough (a gap). ``--from-start`` replays the retained history.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import TextIO

import grpc

from pkg.clients.signalman import Gap, SignalmanClient, SubscriptionError
from pkg.common.config import ConfigError
from pkg.common.logging import configure_logging
from pkg.common.tls import add_tls_arguments, credentials_from_args
from pkg.proto.signalman.v1 import signalman_pb2 as pb


def render(item: pb.Event | Gap, as_json: bool) -> str:
    """One output line for an event or a gap."""
    if isinstance(item, Gap):
        if as_json:
            return json.dumps({"gap": item.__dict__})
        return (f"!! history gap on {item.channel}: resumed at offset {item.resumed_from} "
                f"(epoch {item.epoch}): {item.reason}")  # fmt: skip
    if as_json:
        return json.dumps({
            "channel": item.channel, "offset": item.offset, "epoch": item.epoch, "id": item.id,
            "type": item.type, "tenant": item.tenant, "time": item.time,
            "data": json.loads(item.data_json or "{}"),
        })  # fmt: skip
    return f"{item.offset:>8} {item.channel:<8} {item.type:<20} {item.data_json}"


def _code_name(code: grpc.StatusCode | int) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


async def tail(args: argparse.Namespace, out: TextIO) -> int:
    client = SignalmanClient(
        args.targets, token=args.token, credentials=credentials_from_args(args)
    )
    resume = {c: ("", 0) for c in args.channels} if args.from_start else None
    try:
        async with client.subscribe(args.channels, resume_from=resume) as sub:
            count = 0
            async for item in sub:
                print(render(item, args.json), file=out, flush=True)
                count += 1
                if args.limit and count >= args.limit:
                    return 0
    except SubscriptionError as exc:
        print(f"signalman-tail: {exc.message} ({_code_name(exc.code)})", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as ``tail`` takes it (targets split into a list); tests build theirs here
    too, so an option added to the parser reaches them with its default."""
    parser = argparse.ArgumentParser(prog="signalman-tail", description=__doc__.split("\n")[0])
    parser.add_argument(
        "channels", nargs="*", default=["all"],
        help="channels: all, streams, routing, nodes, system (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--targets", default=os.environ.get("SIGNALMAN_TARGETS", "127.0.0.1:18070"),
        help="comma-separated replica addresses (env SIGNALMAN_TARGETS)",
    )  # fmt: skip
    parser.add_argument(
        "--token", default=os.environ.get("SIGNALMAN_TOKEN"),
        help="bearer token; its tenant is the one tailed (env SIGNALMAN_TOKEN)",
    )  # fmt: skip
    parser.add_argument("--from-start", action="store_true", help="replay retained history first")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, default=0, help="exit after this many lines")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("a token is required (--token or SIGNALMAN_TOKEN)")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("signalman-tail", level=os.environ.get("LOG_LEVEL", "WARNING"))
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(tail(args, sys.stdout))
        except ConfigError as exc:
            print(f"signalman-tail: {exc}", file=sys.stderr)
            return 2
    return 130


if __name__ == "__main__":
    sys.exit(main())
