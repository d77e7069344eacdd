"""Authorization: one access map per service, deny by default, for gRPC methods and HTTP routes.

Each service declares an ``AccessMap``: every gRPC method it serves (full name,
``/package.Service/Method``) and every HTTP route (``METHOD /path``) with the ``Rule`` it needs:
``PUBLIC`` (anyone, a token optional) or ``needs(role, ...)`` (a valid token whose credential
has one of the roles). A method missing from the map is refused with PERMISSION_DENIED; an HTTP
app cannot be built with an unmapped route. Refusals name what was missing.

``AuthzInterceptor`` applies the map to a gRPC server and also: turns an undecodable request
body into INVALID_ARGUMENT with one log line (grpc's own answer is UNKNOWN with a traceback), and
caps the streams one credential holds open at once (RESOURCE_EXHAUSTED past the cap).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pkg.common.auth import (
    ANONYMOUS,
    OPERATOR,
    Authenticator,
    Principal,
    bearer_token,
    set_current_principal,
)
from pkg.common.tls import principal_from_certificate

log = structlog.get_logger("pkg.common.authz")

DEFAULT_MAX_STREAMS = 1_000


@dataclass(frozen=True)
class Rule:
    """Who may call: anyone (``public``) or a credential holding one of ``roles``."""

    roles: frozenset[str] = frozenset()
    public: bool = False

    def describe(self) -> str:
        return "public" if self.public else " or ".join(sorted(self.roles))


PUBLIC = Rule(public=True)


def needs(*roles: str) -> Rule:
    """A rule requiring one of ``roles``."""
    if not roles:
        raise ValueError("needs() takes at least one role (use PUBLIC for anyone)")
    return Rule(frozenset(roles))


# The standard services every platform gRPC server mounts (pkg.common.grpcserver): health is
# public (load balancers probe it), reflection describes the whole API surface: operators only.
STANDARD_GRPC: dict[str, Rule] = {
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": needs(OPERATOR),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": needs(OPERATOR),
}


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    code: str
    message: str

    @property
    def http_status(self) -> int:
        return 401 if self.code == "UNAUTHENTICATED" else 403


class AccessMap:
    """The roles every gRPC method and HTTP route of one service needs."""

    def __init__(
        self, service: str, grpc_methods: Mapping[str, Rule], http_routes: Mapping[str, Rule]
    ) -> None:
        self.service = service
        self.grpc = {**STANDARD_GRPC, **grpc_methods}
        self.http = dict(http_routes)

    def unmapped(self, methods: Iterable[str]) -> list[str]:
        """The methods (full names) this map does not cover."""
        return sorted(m for m in methods if m not in self.grpc)

    def authorize(self, key: str, rules: Mapping[str, Rule], token: str | None,
                  authenticate: Authenticator) -> Principal | Denial:  # fmt: skip
        """The caller's principal, or why it may not call ``key``."""
        rule = rules.get(key)
        if rule is None:
            return Denial(
                "PERMISSION_DENIED",
                f"{key} is not in {self.service}'s access map: refused (deny by default)",
            )
        if token is None:
            if rule.public:
                return ANONYMOUS
            return Denial("UNAUTHENTICATED", f"{key} requires a bearer token ({rule.describe()})")
        if not token:
            return Denial("UNAUTHENTICATED", "authorization is not a bearer token")
        principal = authenticate(token)
        if principal is None:
            return Denial("UNAUTHENTICATED", "unknown bearer token")
        return self._admit(key, rule, principal)

    def _admit(self, key: str, rule: Rule, principal: Principal) -> Principal | Denial:
        if rule.public or principal.has_any(rule.roles):
            return principal
        held = ", ".join(sorted(principal.roles)) or "no role"
        return Denial(
            "PERMISSION_DENIED",
            f"{key} requires role {rule.describe()} (credential {principal.name!r} has {held})",
        )

    def authorize_certificate(
        self, key: str, rules: Mapping[str, Rule], principal: Principal | None
    ) -> Principal | Denial:
        """Like ``authorize`` for a call without a token whose client certificate mapped to
        ``principal`` (None: its certificate names no known identity)."""
        rule = rules.get(key)
        if rule is None:
            return Denial(
                "PERMISSION_DENIED",
                f"{key} is not in {self.service}'s access map: refused (deny by default)",
            )
        if principal is None:
            if rule.public:
                return ANONYMOUS
            return Denial(
                "UNAUTHENTICATED",
                f"{key} requires a bearer token or a client certificate mapped in "
                f"PLATFORM_TLS_IDENTITIES ({rule.describe()})",
            )
        return self._admit(key, rule, principal)


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------


class _Undecodable:
    """What the guarded deserializer returns instead of raising inside grpc."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guard_deserializer(des: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if des is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return des(data)
        except Exception as exc:  # DecodeError and whatever a custom deserializer raises
            return _Undecodable(exc)

    return deserialize


def _undecodable_message(method: str, bad: _Undecodable) -> str:
    return f"{method}: request body is not a valid message ({type(bad.error).__name__})"


# Refusing a client-streaming call: grpcio's asyncio client reports INTERNAL "Internal error
# from Core" instead of the status it was sent when one of its own writes is still in flight as
# the status arrives (grpc/grpc#36066: the failed write overwrites the status): 66% of refused
# node streams whose client writes a few messages at once, measured. The server first reads
# what the client is sending, until it pauses for DRAIN_QUIET_S (or DRAIN_MAX_S, at most
# DRAIN_MAX_MESSAGES, have passed), so its writes have landed when the status goes out: 0 of
# 800 then. A refusal of a stream costs the caller that pause (50 ms) more.
DRAIN_QUIET_S = 0.05
DRAIN_MAX_S = 1.0
DRAIN_MAX_MESSAGES = 100


async def drain_requests(requests: AsyncIterator[Any]) -> None:
    """Read (and drop) what a client is sending until it pauses, half-closes or the bounds
    above are reached: call before refusing a client-streaming call (see above)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DRAIN_MAX_S
    iterator = requests.__aiter__()
    try:
        for _ in range(DRAIN_MAX_MESSAGES):
            left = end - loop.time()
            if left <= 0:
                return
            await asyncio.wait_for(iterator.__anext__(), min(DRAIN_QUIET_S, left))
    except (StopAsyncIteration, TimeoutError):
        return
    except grpc.RpcError:  # the client went away meanwhile: nothing to answer
        return


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    drain = handler.request_streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if drain:
            await drain_requests(request)
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if drain:
            await drain_requests(request)
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    # No deserializer: a refused call never parses the body it was refused for.
    def raw(data: bytes) -> bytes:
        return data

    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, raw, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, raw, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, raw, ser)
    return grpc.unary_unary_rpc_method_handler(unary, raw, ser)


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Applies an ``AccessMap`` to every call of a server (see the module docstring)."""

    def __init__(
        self,
        authenticate: Authenticator,
        access: AccessMap,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        identities: Mapping[str, Principal] | None = None,
    ) -> None:
        self._authenticate = authenticate
        self.access = access
        # Client-certificate SANs -> credentials (PLATFORM_TLS_IDENTITIES, with mTLS): a call
        # without a bearer token is authenticated by its verified certificate.
        self.identities = dict(identities or {})
        self.max_streams = max_streams
        self.streams: dict[str, int] = {}  # open streams per credential name
        self.refused = 0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                token = bearer_token(value)
                break
        if token is None and self.identities:
            return self._by_certificate(handler, method)
        verdict = self.access.authorize(method, self.access.grpc, token, self._authenticate)
        if isinstance(verdict, Denial):
            self.refused += 1
            return _abort_handler(handler, grpc.StatusCode[verdict.code], verdict.message)
        return self._wrap(handler, method, verdict)

    def _by_certificate(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Decide at call time, when the connection's verified certificate is known: its mapped
        credential is authorized like a token's, then the call runs as ``_wrap`` runs it."""
        interceptor = self

        def decide(context: Any) -> Principal | Denial:
            found = principal_from_certificate(context.auth_context(), interceptor.identities)
            return interceptor.access.authorize_certificate(method, interceptor.access.grpc, found)

        def inner(verdict: Principal) -> Any:
            wrapped = interceptor._wrap(handler, method, verdict)
            return (
                wrapped.unary_unary
                or wrapped.unary_stream
                or wrapped.stream_unary
                or wrapped.stream_stream
            )

        async def unary(request: Any, context: Any) -> Any:
            verdict = decide(context)
            if isinstance(verdict, Denial):
                interceptor.refused += 1
                if handler.request_streaming:
                    await drain_requests(request)
                await context.abort(grpc.StatusCode[verdict.code], verdict.message)
                return None  # not reached: abort raises
            return await inner(verdict)(request, context)

        async def stream(request: Any, context: Any) -> Any:
            verdict = decide(context)
            if isinstance(verdict, Denial):
                interceptor.refused += 1
                if handler.request_streaming:
                    await drain_requests(request)
                await context.abort(grpc.StatusCode[verdict.code], verdict.message)
                return  # not reached: abort raises
            async for item in inner(verdict)(request, context):
                yield item

        des = _guard_deserializer(handler.request_deserializer)
        ser = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, des, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream, des, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary, des, ser)
        return grpc.stream_stream_rpc_method_handler(stream, des, ser)

    def _stream_slot(self, principal: Principal) -> str | None:
        """Take one stream slot of ``principal``; the refusal message when none is left."""
        limit = principal.max_streams or self.max_streams
        held = self.streams.get(principal.name, 0)
        if held >= limit:
            return (
                f"credential {principal.name!r} already holds {held} open streams "
                f"(limit {limit}): close some first"
            )
        self.streams[principal.name] = held + 1
        return None

    def _release(self, principal: Principal) -> None:
        left = self.streams.get(principal.name, 1) - 1
        if left <= 0:
            self.streams.pop(principal.name, None)
        else:
            self.streams[principal.name] = left

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, principal: Principal
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Run the handler with ``principal`` current, a guarded deserializer and (streams)
        a slot of the credential's stream quota."""
        interceptor = self

        async def bad_request(context: Any, bad: _Undecodable) -> None:
            message = _undecodable_message(method, bad)
            log.warning("undecodable_request", method=method, error=type(bad.error).__name__)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        async def requests_of(iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for item in iterator:
                if isinstance(item, _Undecodable):
                    await bad_request(context, item)
                yield item

        def wrap_unary(fn: Any, request_streaming: bool) -> Any:
            async def call(request: Any, context: Any) -> Any:
                set_current_principal(principal)
                if request_streaming:
                    request = requests_of(request, context)
                elif isinstance(request, _Undecodable):
                    await bad_request(context, request)
                return await fn(request, context)

            return call

        def wrap_stream(fn: Any, request_streaming: bool) -> Any:
            async def call(request: Any, context: Any) -> Any:
                set_current_principal(principal)
                refusal = interceptor._stream_slot(principal)
                if refusal is not None:
                    if request_streaming:
                        await drain_requests(request)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                if request_streaming:
                    request = requests_of(request, context)
                elif isinstance(request, _Undecodable):
                    await bad_request(context, request)
                try:
                    result = fn(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:  # a handler that writes with context.write() and returns None
                        await result
                finally:
                    interceptor._release(principal)

            return call

        des = _guard_deserializer(handler.request_deserializer)
        ser = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary, False), des, ser
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream, False), des, ser
            )
        if handler.stream_unary:
            # One response: a client-streaming call still holds a stream while it is open.
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary, True), des, ser
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream, True), des, ser
        )


# --------------------------------------------------------------------------------------------
# HTTP (Starlette)
# --------------------------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]


class HttpGuard:
    """The HTTP half of an access map: wraps every route's endpoint with its rule."""

    def __init__(self, access: AccessMap, authenticate: Authenticator) -> None:
        self.access = access
        self._authenticate = authenticate

    def principal(self, request: Request, key: str) -> Principal | Denial:
        token = bearer_token(request.headers.get("authorization"))
        return self.access.authorize(key, self.access.http, token, self._authenticate)

    def is_operator(self, request: Request) -> bool:
        """Does the request carry an operator credential? (for operator-only detail on a
        public route, e.g. the full /health document)."""
        token = bearer_token(request.headers.get("authorization"))
        if not token:
            return False
        principal = self._authenticate(token)
        return principal is not None and principal.has_role(OPERATOR)

    def routes(self, routes: Iterable[BaseRoute]) -> list[BaseRoute]:
        """The routes, each behind its rule; an unmapped route (or one that is not a plain
        ``Route``, which this cannot check) is a build error."""
        guarded: list[BaseRoute] = []
        for route in routes:
            if not isinstance(route, Route):
                raise TypeError(f"{self.access.service}: cannot guard {route!r}")
            methods = sorted((route.methods or {"GET"}) - {"HEAD"})
            keys = [f"{m} {route.path}" for m in methods]
            missing = [k for k in keys if k not in self.access.http]
            if missing:
                raise LookupError(
                    f"{self.access.service}: HTTP route {missing[0]} is not in the access map"
                )
            guarded.append(Route(route.path, self._guard(route), methods=methods))
        return guarded

    def _guard(self, route: Route) -> Endpoint:
        endpoint: Endpoint = route.endpoint
        path = route.path

        async def guarded(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            verdict = self.principal(request, f"{method} {path}")
            if isinstance(verdict, Denial):
                headers = {"WWW-Authenticate": "Bearer"} if verdict.http_status == 401 else None
                return JSONResponse(
                    {"error": verdict.message, "code": verdict.code},
                    status_code=verdict.http_status,
                    headers=headers,
                )
            request.state.principal = verdict
            return await endpoint(request)

        return guarded
