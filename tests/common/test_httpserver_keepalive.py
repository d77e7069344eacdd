"""The HTTP side keeps idle keep-alive connections for ``keep_alive_s`` (uvicorn's own default,
5 s, closes them before the pools in front do: every request after a pause would pay a new
connection, with HTTPS a new TLS handshake)."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette

from pkg.common.health import HealthReport
from pkg.common.httpserver import HttpServer, HttpSettings, ops_routes

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _open_after_idle(server: HttpServer, idle_s: float) -> bool:
    """One request, ``idle_s`` of silence, then whether the server still has the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(REQUEST)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(idle_s)
        writer.write(REQUEST)
        await writer.drain()
        try:
            again = await asyncio.wait_for(reader.read(12), 5)
        except ConnectionError:
            return False
        return again.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_an_idle_connection_lives_for_keep_alive_s() -> None:
    assert HttpSettings().keep_alive_s > 60  # longer than the usual pools' idle timeouts
    app = Starlette(routes=ops_routes(lambda: HealthReport.of("svc", "svc-1")))
    short = HttpServer(app, HttpSettings(keep_alive_s=1.0))
    longer = HttpServer(app, HttpSettings(keep_alive_s=4.0))
    await short.start()
    await longer.start()
    try:
        kept_short, kept_longer = await asyncio.gather(
            _open_after_idle(short, 2.0), _open_after_idle(longer, 2.0)
        )
        assert not kept_short  # closed by the server after 1 s idle
        assert kept_longer
    finally:
        await short.stop()
        await longer.stop()
