"""A TCP relay in front of a real server that can cut its clients off the way a network
partition does: silently (bytes vanish, no FIN, no RST), so the client only learns of it from
its own timeouts. ``heal`` ends the connections that lived through the cut (as their peers'
TCP would eventually) and new ones work again. For tests that need one process cut from a
store while others still reach it, without network namespaces."""

from __future__ import annotations

import asyncio
import contextlib


class Blackhole:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> Blackhole:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.cut:  # accepted, never answered: like a SYN that is dropped, seen from the client
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if not self.cut:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    def blackhole(self) -> None:
        self.cut = True

    def heal(self) -> None:
        self.cut = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
