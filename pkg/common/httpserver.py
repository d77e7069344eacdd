"""The one way to build a service's HTTP side: Starlette routes served by uvicorn on the
service's own event loop, with ``/health`` (the ``pkg.common.health`` report) and ``/metrics``.

Every service mounts ``ops_routes(health)`` in its Starlette app and runs it with
``HttpServer``; the listener is created here only: HTTPS (client certificates required with
``PLATFORM_TLS_CLIENT_AUTH=require``) when ``HttpSettings.tls`` has a certificate, which is
reloaded from disk when its files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from pkg.common import tracing
from pkg.common.health import HealthSource
from pkg.common.telemetry import CONTENT_TYPE, prometheus_text
from pkg.common.tls import (
    PLAINTEXT,
    RELOAD_CHECK_S,
    CertificateFiles,
    TlsSettings,
    server_ssl_context,
)

log = structlog.get_logger("pkg.common.httpserver")


def ops_routes(
    health: HealthSource, detail_for: Callable[[Request], bool] | None = None
) -> list[BaseRoute]:
    """``/health`` (200 unless not serving, then 503) and ``/metrics`` (Prometheus text).

    ``detail_for(request)``: whether this caller sees the full report (an operator); others get
    the status alone (``{"status": "ok"}``). None: everyone sees it all.
    """

    async def health_endpoint(request: Request) -> Response:
        report = health()
        if detail_for is not None and not detail_for(request):
            return JSONResponse({"status": report.status.value}, status_code=report.http_status)
        return JSONResponse(report.to_json(), status_code=report.http_status)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(prometheus_text(), media_type=CONTENT_TYPE)

    return [Route("/health", health_endpoint), Route("/metrics", metrics_endpoint)]


@dataclass(frozen=True)
class HttpSettings:
    """Where and how the HTTP side listens. ``port`` 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    # uvicorn's WebSocket implementation ("none": no WebSocket routes served) and the largest
    # frame it accepts (a bigger one closes the socket with 1009).
    ws: str = "none"
    ws_max_size: int = 16 * 1024 * 1024
    graceful_s: float = 5.0
    # How long an idle keep-alive connection stays open. Longer than the idle timeout of the
    # load balancers and pools in front (uvicorn's 5 s default closes them first: every
    # request after a pause then pays a new connection, a TLS handshake with HTTPS).
    keep_alive_s: float = 75.0
    tls: TlsSettings = PLAINTEXT  # PLATFORM_TLS_*: HTTPS when it has a certificate


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on the caller's event loop; signals stay with the host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serve ``app`` until ``stop()``: ``start()`` returns once the port is bound (a bind error
    raises there) and ``port`` is the bound one."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        app = tracing.trace_http(app)  # callers' traces continue over every service's HTTP side
        self.tls = settings.tls
        self.ssl = server_ssl_context(settings.tls)
        self._files = CertificateFiles(settings.tls) if self.ssl is not None else None
        ssl_factory = None
        if self.ssl is not None:
            ctx = self.ssl

            def ssl_factory(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
                return ctx

        config = uvicorn.Config(
            app,
            ssl_context_factory=ssl_factory,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            lifespan="off",  # the service's app object owns start and stop
            ws=settings.ws,
            ws_max_size=settings.ws_max_size,
            timeout_graceful_shutdown=int(settings.graceful_s),
            timeout_keep_alive=int(settings.keep_alive_s),
            # uvicorn would otherwise rewrite the client address from X-Forwarded-For for any
            # peer on 127.0.0.1 (its default forwarded_allow_ips): a local caller could pick
            # the address it is rate limited as. The services' own TRUSTED_PROXIES settings
            # decide whom to believe (pkg.common.forwarded).
            proxy_headers=False,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[Any] | None = None
        self._reload_task: asyncio.Task[Any] | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self.ssl is not None else "http"

    async def _reload_certificates(self) -> None:
        """Load changed certificate files into the listening context: new handshakes get the
        new certificate, open connections keep theirs (a CA removed from the bundle stays
        trusted until a restart: an ``SSLContext`` only adds CAs)."""
        assert self._files is not None and self.ssl is not None
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            if self._files.changed() is None:
                continue
            try:
                self.ssl.load_cert_chain(self.tls.cert, self.tls.key)
                if self.tls.ca:
                    self.ssl.load_verify_locations(self.tls.ca)
            except (ssl.SSLError, OSError) as exc:  # files replaced again while loading
                log.error("https_tls_reload_failed", error=str(exc))

    async def start(self) -> None:
        task = asyncio.create_task(self._server.serve(), name="http-server")
        self._task = task
        while not self._server.started:
            if task.done():
                task.result()  # raises the bind error
                raise OSError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        if self._files is not None:
            self._reload_task = asyncio.create_task(
                self._reload_certificates(), name="http-tls-reload"
            )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let open requests finish for up to ``grace`` seconds."""
        if self._reload_task is not None:
            self._reload_task.cancel()
            self._reload_task = None
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 1)
        except (TimeoutError, Exception):
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._task = None
