"""The ASGI application: GraphQL over HTTP and WebSocket, GraphiQL, /health and /metrics.

Every GraphQL request over HTTP passes, in order: content negotiation (``Accept``: 406 when
nothing we serve fits), the auth check (JWT -> Principal; bad token = 401), the rate limiter
(tenant bucket, or per-IP bucket for anonymous callers; 429 with ``Retry-After``), size limits
(413), then Strawberry: parse, validation, the access map's check of every root field
(``api_gateway.access``: 401 without a token, 403 without the role), execution. Every answer,
errors included, is a GraphQL-shaped JSON body with ``extensions.code`` and no ``data`` entry
when execution never started; with
``application/graphql-response+json`` a request error is a 4xx (docs/graphql-http.md). Nothing a
client sends can produce a 500. WebSocket upgrades get the same checks, then the protocol handler
of ``api_gateway.websocket`` (docs/graphql-websocket.md).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from cross_web import HTTPException
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError

from api_gateway import access, errors
from api_gateway.auth import AuthError, JwtAuthenticator, is_anonymous
from api_gateway.errors import format_error
from api_gateway.fastpath import answer_key
from api_gateway.ops import OperatorGuard
from api_gateway.persisted import (
    PersistedQueries,
    PersistedQueryInvalid,
    PersistedQueryNotFound,
    not_found_body,
)
from api_gateway.service import Gateway
from api_gateway.websocket import CLOSE_RATE_LIMITED, BridgeTransportWSHandler, retry_after_s
from api_gateway.websocket import PROTOCOL as WS_PROTOCOL
from api_gateway.websocket import refusal as ws_refusal
from bridge.answers import AnswerCache, Recorder, current_recorder, recording
from bridge.ratelimit import RateLimiter
from bridge.tenant_limits import CachedLimits
from bridge.token_bucket import Decision, Limit
from pkg.common.auth import ANONYMOUS, Principal
from pkg.common.forwarded import HEADER as FORWARDED
from pkg.common.forwarded import NO_PROXIES, TrustedProxies
from pkg.common.health import HealthSource

log = structlog.get_logger("bridge.http")
STATIC = Path(__file__).parent / "static"
# Responses by (status, error code), read at scrape time (api_gateway.metrics): a dict update
# per request instead of an instrument call; by status alone for /health's figures.
RESPONSES: Counter[tuple[int, str]] = Counter()
RESPONSES_BY_STATUS: Counter[int] = Counter()


def _count_response(status: int, code: str) -> None:
    RESPONSES[status, code] += 1
    RESPONSES_BY_STATUS[status] += 1


@dataclass
class Limits:
    max_body_bytes: int = 65_536
    max_query_bytes: int = 16_384


# Answer keys of recent (caller, body) pairs; the memo starts over when it holds this many.
_ANSWER_KEYS_KEPT = 4096
_UNKNOWN: Any = object()
_FORWARDED = FORWARDED.lower().encode("latin-1")
# The request headers the view reads, found in one pass over the scope's list.
_READ_HEADERS = frozenset((b"accept", b"authorization", b"content-length", b"content-type"))
_VIEW_METHODS = frozenset(("GET", "POST"))


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Authentication and rate limiting, shared by the HTTP and WebSocket paths."""

    def __init__(
        self,
        auth: JwtAuthenticator,
        limiter: RateLimiter,
        tenant_limits: CachedLimits,
        anon_limit: Limit,
        proxies: TrustedProxies = NO_PROXIES,
    ) -> None:
        self.auth = auth
        self.limiter = limiter
        self.tenant_limits = tenant_limits
        self.anon_limit = anon_limit
        self.proxies = proxies

    def client_ip(self, conn: HTTPConnection) -> str:
        """The caller's address: the socket peer, or behind a trusted proxy the rightmost
        X-Forwarded-For hop that is not one (pkg.common.forwarded)."""
        return self.client_ip_of(conn.scope)

    def client_ip_of(self, scope: Scope) -> str:
        """``client_ip`` read from the ASGI scope itself (no request object on the hot path)."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.proxies.networks:
            return str(peer)[:64]
        forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == _FORWARDED]
        return self.proxies.client_address(peer, forwarded)[:64]

    async def bucket(self, principal: Principal, ip: str) -> tuple[str, Limit]:
        """The caller's rate-limit bucket: its tenant's, or its IP's when anonymous."""
        if is_anonymous(principal):
            return f"ip:{ip}", self.anon_limit
        limits = await self.tenant_limits.limits_for(principal.tenant)
        return f"tenant:{principal.tenant}", limits.requests

    async def admit(self, principal: Principal, ip: str) -> Decision:
        return await self.limiter.check(*await self.bucket(principal, ip))


def rate_headers(d: Decision) -> dict[str, str]:
    """``X-RateLimit-Reset`` is the seconds until the bucket is full again; on a refusal it is
    the seconds until the next request may pass, the same figure as ``Retry-After``."""
    headers = {
        "X-RateLimit-Limit": str(d.limit),
        "X-RateLimit-Remaining": str(d.remaining),
        "X-RateLimit-Reset": str(d.reset_s),
    }
    if not d.allowed:
        headers["Retry-After"] = headers["X-RateLimit-Reset"] = str(retry_after_s(d))
    return headers


# GraphQL over HTTP (the GraphQL Foundation's spec): the response media types.
JSON = "application/json"
GRAPHQL_RESPONSE = "application/graphql-response+json"


def negotiate(accept: str | None) -> str | None:
    """The media type to answer with, from an ``Accept`` header; None when nothing we serve is
    acceptable (406). No header: ``application/json`` (what clients predating the spec expect);
    wildcards: ``application/json``; equal weights favour ``application/graphql-response+json``.
    """
    if accept is None or not accept.strip():
        return JSON
    best: tuple[float, int, str] | None = None
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == GRAPHQL_RESPONSE:
            choice = (q, 2, GRAPHQL_RESPONSE)
        elif media in (JSON, "application/*", "*/*"):
            choice = (q, 1, JSON)
        else:
            continue
        if q > 0 and (best is None or choice[:2] > best[:2]):
            best = choice
    return best[2] if best else None


_NEGOTIATED: dict[str | None, str | None] = {}


def negotiate_cached(accept: str | None) -> str | None:
    """``negotiate``, remembered for the few ``Accept`` values a deployment's clients send."""
    try:
        return _NEGOTIATED[accept]
    except KeyError:
        pass
    media = negotiate(accept)
    if len(_NEGOTIATED) >= 256:
        _NEGOTIATED.clear()
    _NEGOTIATED[accept] = media
    return media


def _media_header(media: str) -> str:
    return f"{media}; charset=utf-8" if media == GRAPHQL_RESPONSE else media


class _KeptAnswer:
    """A kept answer's response as two ASGI messages: what Starlette's ``Response`` sends, with
    none of its header handling (this is the whole of a repeated query's answer)."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, media: str, rate: dict[str, str]) -> None:
        self.body = body
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rate.items()]
        self.headers.append((b"content-length", str(len(body)).encode("latin-1")))
        self.headers.append((b"content-type", _media_header(media).encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    media: str = JSON,
) -> Response:
    _count_response(status, code)
    return JSONResponse(
        errors.error_body(code, message),
        status_code=status,
        headers=headers,
        media_type=f"{media}; charset=utf-8" if media == GRAPHQL_RESPONSE else media,
    )


class BridgeGraphQL(GraphQL[dict[str, Any], None]):
    """Strawberry's ASGI view with Bridge's guard in front and its error format."""

    graphql_transport_ws_handler_class = BridgeTransportWSHandler

    def __init__(
        self,
        schema: Any,
        gateway: Gateway,
        guard: RequestGuard,
        limits: Limits,
        graphiql_html: str,
        persisted: PersistedQueries | None = None,
        connection_init_timeout_s: float = 10.0,
        answers: AnswerCache | None = None,
    ) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql",
            # Only graphql-transport-ws: the legacy graphql-ws is refused at the upgrade.
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            connection_init_wait_timeout=timedelta(seconds=connection_init_timeout_s),
        )
        self.gateway = gateway
        self.guard = guard
        self.limits = limits
        # Automatic persisted queries (api_gateway.persisted): hash-only requests.
        self.persisted = persisted or PersistedQueries(max_query_bytes=limits.max_query_bytes)
        # Whole answers of repeated queries (bridge.answers): None turns the fast path off.
        self.answers = answers
        self._answer_keys: dict[tuple[Principal, bytes], str | None] = {}
        self._ide_html = graphiql_html

    async def render_graphql_ide(self, request: Request) -> Response:
        return HTMLResponse(self._ide_html)

    async def get_context(self, request: Any, response: Any) -> dict[str, Any]:
        principal = request.scope.get("bridge.principal", ANONYMOUS)
        return {
            "request": request,
            "response": response,
            "principal": principal,
            "gateway": self.gateway,
            # The WebSocket path: when the token stops being valid, where the caller is.
            "expires_at": request.scope.get("bridge.expires_at"),
            "client_ip": request.scope.get("bridge.client_ip", ""),
        }

    async def process_result(self, request: Any, result: ExecutionResult) -> Any:
        body: dict[str, Any] = {}
        if isinstance(result, PreExecutionError):
            # A request error: execution never started, so the response has no "data" entry,
            # and the graphql-response+json media type answers it with a 4xx; a refusal by the
            # access map with 401/403 whatever the media type (docs/graphql-http.md).
            request.scope["bridge.request_error"] = True
            refused = access.refusal_status(result.errors or [])
            if refused is not None:
                request.scope["bridge.refused"] = refused
        else:
            body["data"] = result.data
        if result.errors:
            body["errors"] = [format_error(e) for e in result.errors]
            recorder = current_recorder()
            if recorder is not None:
                recorder.forbid()
        if result.extensions:
            body["extensions"] = result.extensions
        return body

    async def parse_http_body(self, request: Any) -> Any:
        try:
            data = await super().parse_http_body(request)
        except (AttributeError, TypeError) as exc:
            # Strawberry assumes a JSON object; a bare string or number must be a 400, not a 500.
            raise HTTPException(400, "the body must be a JSON object with a 'query'") from exc
        query = getattr(data, "query", None)
        if isinstance(query, str) and len(query.encode()) > self.limits.max_query_bytes:
            raise HTTPException(413, f"query larger than {self.limits.max_query_bytes} bytes")
        try:
            if isinstance(data, list):
                return [self.persisted.resolve(item) for item in data]
            return self.persisted.resolve(data)
        except PersistedQueryInvalid as exc:
            raise HTTPException(400, str(exc)) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            response: Response | _KeptAnswer = await self._http(scope, receive)
        except Exception as exc:
            # What Starlette's error middleware did when the route ran behind it (GraphQLRoute
            # calls the view first): a JSON 500, one log line.
            log.error("unhandled", error=repr(exc), path="/graphql")
            response = _error(500, errors.INTERNAL, "internal error")
        await response(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refusals carry their reason: an upgrade without our subprotocol is an HTTP 400 with
        a body; a refused token or an exhausted rate limit is accepted, then closed with the
        protocol's code and a reason (see ``api_gateway.websocket``)."""
        ws = WebSocket(scope, receive, send)
        offered = [p.strip() for p in scope.get("subprotocols") or []]
        if WS_PROTOCOL not in offered:
            await _refuse_upgrade(
                ws,
                f"unsupported WebSocket subprotocol {offered[:3]}: this endpoint speaks "
                f"{WS_PROTOCOL!r} only (the legacy 'graphql-ws' is not supported)",
            )
            return
        principal: Principal = ANONYMOUS
        expires_at: float | None = None
        ip = self.guard.client_ip(ws)
        try:
            principal, expires_at = self.guard.auth.authenticate_until(
                ws.headers.get("authorization")
            )
        except AuthError as exc:
            await ws.accept(subprotocol=WS_PROTOCOL)
            await ws.close(*ws_refusal(exc))
            return
        decision = await self.guard.admit(principal, ip)
        if not decision.allowed:
            await ws.accept(subprotocol=WS_PROTOCOL)
            await ws.close(
                CLOSE_RATE_LIMITED, f"rate limited: retry after {retry_after_s(decision)} s"
            )
            return
        scope["bridge.principal"] = principal
        scope["bridge.expires_at"] = expires_at
        scope["bridge.client_ip"] = ip
        await self.run(ws)

    async def _http(self, scope: Scope, receive: Receive) -> Response | _KeptAnswer:
        # The headers read here, in one pass over the scope (a Starlette ``Headers`` lookup is a
        # scan of the list each time): the first value of each, as Starlette's ``get``.
        found: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in _READ_HEADERS and name not in found:
                found[name] = value.decode("latin-1")
        accept = found.get(b"accept")
        if (
            scope["method"] == "GET"
            and "text/html" in (accept or "")
            and "query" not in Request(scope).query_params
        ):
            return await self.render_graphql_ide(Request(scope, receive))
        media = negotiate_cached(accept)
        if media is None:
            return _error(
                406,
                errors.NOT_ACCEPTABLE,
                f"cannot answer with any type in Accept; use {GRAPHQL_RESPONSE} or {JSON}",
            )
        try:
            principal = self.guard.auth.authenticate(found.get(b"authorization"))
        except AuthError as exc:
            return _error(
                401,
                errors.UNAUTHENTICATED,
                str(exc),
                {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc}"'},
                media,
            )
        ip = self.guard.client_ip_of(scope)
        key, body = await self._answer_key(scope, receive, found, principal)
        if key is not None and self.answers is not None:
            bucket, limit = await self.guard.bucket(principal, ip)
            decision, answer = await self.answers.admit(bucket, limit, key)
            if answer is not None:
                # A kept answer: charged, authenticated, its entries current. No GraphQL.
                _count_response(200, "OK")
                return _KeptAnswer(answer, media, rate_headers(decision))
        else:
            decision = await self.guard.admit(principal, ip)
        headers = rate_headers(decision)
        if not decision.allowed:
            return _error(
                429,
                errors.RATE_LIMITED,
                f"rate limit exceeded: retry after {headers['Retry-After']} s",
                headers,
                media,
            )
        length = found.get(b"content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            return _error(
                413,
                errors.PAYLOAD_TOO_LARGE,
                f"body larger than {self.limits.max_body_bytes} bytes",
                headers,
                media,
            )
        scope["bridge.principal"] = principal
        if body is not None:
            receive = _replay(body)
        limited = Request(scope, _limit_body(receive, self.limits.max_body_bytes))
        try:
            if key is None:
                response = await self.run(limited)
            else:
                with recording() as recorder:
                    response = await self.run(limited)
                if recorder.cacheable and recorder.reads and response.status_code == 200:
                    response.background = self._keep(key, bytes(response.body), recorder)
        except HTTPException as exc:
            code = errors.PAYLOAD_TOO_LARGE if exc.status_code == 413 else errors.BAD_REQUEST
            return _error(exc.status_code, code, exc.reason, headers, media)
        except PersistedQueryNotFound:
            # Apollo's clients answer this one with the query and its hash: a 200 that no
            # cache may keep (the next request registers the query).
            _count_response(200, "PERSISTED_QUERY_NOT_FOUND")
            return JSONResponse(
                not_found_body(),
                headers={**headers, "Cache-Control": "private, no-cache"},
                media_type=_media_header(media),
            )
        except _BodyTooLarge:
            return _error(
                413,
                errors.PAYLOAD_TOO_LARGE,
                f"body larger than {self.limits.max_body_bytes} bytes",
                headers,
                media,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            return _error(
                400,
                errors.BAD_REQUEST,
                f"unreadable request: {exc.__class__.__name__}",
                media=media,
            )
        response.headers.update(headers)
        refused = scope.get("bridge.refused")
        if refused is not None and response.status_code == 200:
            # The spec's "not permitted to issue the request": 401/403 for both media types
            # (application/json too: a client that reads only the status still sees it).
            response.status_code = refused
            response.headers["WWW-Authenticate"] = (
                "Bearer" if refused == 401 else 'Bearer error="insufficient_scope"'
            )
        if media == GRAPHQL_RESPONSE and response.media_type == JSON:
            response.headers["content-type"] = f"{GRAPHQL_RESPONSE}; charset=utf-8"
            if scope.get("bridge.request_error") and response.status_code == 200:
                response.status_code = 400
        code = "OK"
        if refused is not None:
            code = errors.UNAUTHENTICATED if refused == 401 else errors.FORBIDDEN
        _count_response(response.status_code, code)
        return response

    async def _answer_key(
        self, scope: Scope, receive: Receive, headers: dict[bytes, str], principal: Principal
    ) -> tuple[str | None, bytes | None]:
        """The answer key of a POST with a JSON body within the limits, and the body (read
        here, so the full path is given it again); (None, None) for anything else, untouched."""
        if self.answers is None or scope["method"] != "POST":
            return None, None
        length = headers.get(b"content-length", "")
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            return None, None
        if not headers.get(b"content-type", "").startswith("application/json"):
            return None, None
        body = await _read_body(receive)
        # The key is a function of the caller and the body alone: a repeated request (what a
        # kept answer is for) skips the JSON parse, the hashes and the canonical dump.
        memo = (principal, body)
        found = self._answer_keys.get(memo, _UNKNOWN)
        if found is not _UNKNOWN:
            return found, body
        try:
            data = json.loads(body)
        except ValueError:
            return None, body  # the full path answers it with its own error
        key = answer_key(principal, data)
        if len(self._answer_keys) >= _ANSWER_KEYS_KEPT:
            self._answer_keys.clear()
        self._answer_keys[memo] = key
        return key, body

    def _keep(self, key: str, body: bytes, recorder: Recorder) -> BackgroundTask | None:
        """Keep the answer after it was sent (a miss pays no extra round trip before it)."""
        answers = self.answers
        if answers is None:
            return None
        return BackgroundTask(answers.remember, key, body, recorder.reads)


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (what ``Request.body`` reads, without the request object)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """An ASGI ``receive`` that gives back a body already read."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _refuse_upgrade(ws: WebSocket, message: str) -> None:
    response = JSONResponse(errors.error_body(errors.BAD_REQUEST, message), status_code=400)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(response)
    else:  # a server without the denial extension: the protocol's own refusal
        await ws.close(4406, "Subprotocol not acceptable")


def _limit_body(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped


class HeaderLimit:
    """Refuses requests whose headers add up to more than ``max_bytes`` (431, JSON body).

    The HTTP parser accepts very large header blocks; a gateway should not carry them into
    JWT parsing, logs and rate-limit keys.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.max_bytes:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1009})
                    return
                response = _error(
                    431, errors.BAD_REQUEST, f"request headers larger than {self.max_bytes} bytes"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class GraphQLRoute:
    """``GET``/``POST /graphql`` straight to the view, the rest to ``app`` (Starlette).

    The router's matching and Starlette's two exception middlewares were about a tenth of a
    kept answer's CPU; the view answers every error of its own (a 500 included, as the error
    middleware did), so on its one route they only cost. The header limit still applies first.
    """

    def __init__(self, app: ASGIApp, view: BridgeGraphQL, max_header_bytes: int) -> None:
        self.app = app
        self.view = view
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/graphql"
            and scope["method"] in _VIEW_METHODS
            and sum(len(k) + len(v) for k, v in scope["headers"]) <= self.max_header_bytes
        ):
            await self.view(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_asgi(
    view: BridgeGraphQL, health: HealthSource, ops: OperatorGuard, max_header_bytes: int = 16_384
) -> ASGIApp:
    """Routes: /graphql (POST/GET/WS + GraphiQL page; GET and POST ahead of the router:
    ``GraphQLRoute``), /health and /metrics (the shared ops routes), /static/graphiql."""

    async def root(_: Request) -> Response:
        return JSONResponse({"graphql": "/graphql", "health": "/health", "metrics": "/metrics"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "NOT_FOUND", f"no route {request.url.path[:100]}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, errors.BAD_REQUEST, "method not allowed")

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled", error=repr(exc), path=request.url.path[:100])
        return _error(500, errors.INTERNAL, "internal error")

    app = Starlette(
        routes=[
            Route("/", root),
            # Public /health says ok/degraded; /metrics and the full report: operators.
            *ops.routes(health),
            Mount("/static/graphiql", StaticFiles(directory=STATIC / "graphiql")),
            Route("/graphql", view, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal},
    )
    app.add_middleware(HeaderLimit, max_bytes=max_header_bytes)
    return GraphQLRoute(app, view, max_header_bytes)


def load_graphiql_html() -> str:
    return (STATIC / "graphiql.html").read_text()


__all__ = ["BridgeGraphQL", "GraphQLRoute", "Limits", "RequestGuard", "build_asgi", "json"]
