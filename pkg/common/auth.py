"""Bearer-token authentication for gRPC servers: one interceptor shared by every service.

Tokens come from the environment for now: ``PLATFORM_TOKENS="secret1=principal1:role1|role2,..."``
(principal and roles optional; default principal ``service``, roles ``admin``). Methods listed as
public pass without a token. The authenticated ``Principal`` is put in a context variable that
handlers read with ``current_principal()``; it is never taken from a request message.
"""

from __future__ import annotations

import contextvars
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name, a tenant (for tenant-scoped services) and roles."""

    name: str
    tenant: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)

    def has_role(self, role: str) -> bool:
        return role in self.roles


ANONYMOUS = Principal(name="anonymous")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call being handled (ANONYMOUS on public methods without a token)."""
    return _current.get()


def parse_tokens(spec: str) -> dict[str, Principal]:
    """Parse ``token=name@tenant:role|role`` entries separated by commas.

    Raises ``ValueError`` naming the bad entry.
    """
    tokens: dict[str, Principal] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        token, sep, rest = entry.partition("=")
        if not token or (sep and not rest):
            raise ValueError(f"bad token entry {entry!r}: expected token=name[@tenant][:roles]")
        who, _, roles = (rest or "service").partition(":")
        name, _, tenant = who.partition("@")
        role_set = frozenset(r for r in (roles or "admin").split("|") if r)
        tokens[token] = Principal(name=name or "service", tenant=tenant, roles=role_set)
    return tokens


def tokens_from_env(env: Mapping[str, str] | None = None) -> dict[str, Principal]:
    env = os.environ if env is None else env
    return parse_tokens(env.get("PLATFORM_TOKENS", ""))


Authenticator = Callable[[str], Principal | None]


def static_authenticator(tokens: Mapping[str, Principal]) -> Authenticator:
    """Constant-time lookup of a bearer token among known tokens."""
    items = list(tokens.items())

    def authenticate(token: str) -> Principal | None:
        found: Principal | None = None
        for known, principal in items:
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found

    return authenticate


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    des = handler.request_deserializer
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Requires ``authorization: Bearer <token>`` on every method not in ``public_methods``.

    ``public_methods`` holds full method names (``/pkg.Service/Method``) or service prefixes ending
    in ``/`` (``/grpc.health.v1.Health/``). On a public method a valid token still yields its
    principal; an invalid one is rejected. Missing or unknown tokens get UNAUTHENTICATED.
    """

    def __init__(
        self,
        authenticate: Authenticator,
        public_methods: Iterable[str] = (),
        required_role: str | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._public = (
            *public_methods,
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1alpha.ServerReflection/",
            "/grpc.reflection.v1.ServerReflection/",
        )
        self._required_role = required_role

    def _is_public(self, method: str) -> bool:
        return any(method == p or (p.endswith("/") and method.startswith(p)) for p in self._public)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        token = _bearer(handler_call_details.invocation_metadata)
        public = self._is_public(method)
        if token is None and public:
            _current.set(ANONYMOUS)
            return handler
        if not token:
            return _abort_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, f"{method} requires a bearer token"
            )
        principal = self._authenticate(token)
        if principal is None:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if not public and self._required_role and not principal.has_role(self._required_role):
            return _abort_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} requires role {self._required_role!r}",
            )
        return _wrap_with_principal(handler, principal)


def _wrap_with_principal(
    handler: grpc.RpcMethodHandler[Any, Any], principal: Principal
) -> grpc.RpcMethodHandler[Any, Any]:
    """Run the handler with ``principal`` set in its context variable."""

    def wrap_unary(fn: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            _current.set(principal)
            return await fn(request, context)

        return call

    def wrap_stream(fn: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            _current.set(principal)
            result = fn(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write() and returns None
                await result

        return call

    des = handler.request_deserializer
    ser = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), des, ser)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), des, ser)
