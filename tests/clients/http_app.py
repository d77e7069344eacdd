"""A small real HTTP server for the HTTP client tests: scripted 503s, Retry-After, counters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from pkg.devstack.servers import free_port

hits: dict[str, int] = defaultdict(int)


async def flaky(request: Request) -> Response:
    """Fail the first ``fail`` requests for ``key`` with ``status`` (and ``retry_after``)."""
    key = request.path_params["key"]
    hits[key] += 1
    fail = int(request.query_params.get("fail", "0"))
    status = int(request.query_params.get("status", "503"))
    delay = float(request.query_params.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    if fail < 0 or hits[key] <= fail:
        headers = {}
        if "retry_after" in request.query_params:
            headers["Retry-After"] = request.query_params["retry_after"]
        return Response("busy", status_code=status, headers=headers)
    return JSONResponse({"attempt": hits[key], "auth": request.headers.get("authorization", "")})


async def redirect(request: Request) -> Response:
    """A temporary redirect to the ``flaky`` endpoint of the same key."""
    return RedirectResponse(f"/flaky/{request.path_params['key']}", status_code=307)


async def count(request: Request) -> Response:
    return JSONResponse({"hits": hits[request.path_params["key"]]})


app = Starlette(
    routes=[
        Route("/flaky/{key}", flaky, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/redirect/{key}", redirect),
        Route("/count/{key}", count),
    ]
)


class ServerThread:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
