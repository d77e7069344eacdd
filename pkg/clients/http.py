"""HTTP clients on httpx with the same policy as the gRPC channels.

Retries only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) unless the request
carries an ``Idempotency-Key`` header; any method is retried when the connection could not be
made (the request never left). Retryable statuses: 502, 503, 504 and 429; ``Retry-After``
(seconds or HTTP date) is honoured like gRPC pushback. Breakers and budgets are per
authority (scheme://host:port). After the last attempt the last response is returned (a 503
stays a 503 response, not an exception); transport errors are raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import httpx

from pkg.clients.breaker import BREAKER_FAILURE, BREAKER_IGNORE, BreakerOpenError
from pkg.clients.classify import (
    CANCELLED_VERDICT,
    HTTP_RETRYABLE_STATUS,
    Verdict,
    http_idempotent,
    parse_retry_after,
)
from pkg.clients.engine import Classifier, call_async, call_sync
from pkg.clients.http_replicas import HttpReplicas
from pkg.clients.policy import Policy, finite_number, per_replica_breakers
from pkg.clients.runtime import MethodState, Runtime
from pkg.clients.settings import ClientSettings
from pkg.clients.targets import TargetList


class RetryableStatus(Exception):
    """Internal: an HTTP response whose status may be retried (carries the response)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def classify_http(
    exc: BaseException, *, idempotent: bool, capped: bool, time_left: float, wall_now: float
) -> Verdict:
    """Classify one failed HTTP attempt (an httpx error or a retryable status)."""
    if isinstance(exc, BreakerOpenError):
        return Verdict(False, "circuit breaker open (never retried)", BREAKER_IGNORE, code="OPEN")
    if isinstance(exc, RetryableStatus):
        status = exc.response.status_code
        code = f"HTTP_{status}"
        breaker = BREAKER_IGNORE if status == 429 else BREAKER_FAILURE
        pushback = parse_retry_after(exc.response.headers.get("retry-after"), wall_now)
        if not idempotent:
            return Verdict(
                False,
                f"HTTP {status} on a non-idempotent request without Idempotency-Key",
                breaker,
                pushback,
                code,
            )
        return Verdict(True, f"HTTP {status}", breaker, pushback, code)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Verdict(True, "connection failed, never sent", BREAKER_FAILURE, code="CONNECT")
    if isinstance(exc, httpx.PoolTimeout):
        return Verdict(True, "no pooled connection, never sent", BREAKER_IGNORE, code="POOL")
    if isinstance(exc, httpx.TimeoutException):
        if not capped or time_left <= 0:
            return Verdict(False, "overall deadline spent", BREAKER_FAILURE, code="TIMEOUT")
        if idempotent:
            return Verdict(True, "per-attempt timeout", BREAKER_FAILURE, code="TIMEOUT")
        return Verdict(
            False,
            "per-attempt timeout on a non-idempotent request",
            BREAKER_FAILURE,
            code="TIMEOUT",
        )
    if isinstance(exc, httpx.TransportError):
        name = type(exc).__name__
        if idempotent:
            return Verdict(True, f"transport error {name}", BREAKER_FAILURE, code=name)
        return Verdict(
            False,
            f"transport error {name} on a non-idempotent request",
            BREAKER_FAILURE,
            code=name,
        )
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED_VERDICT
    return Verdict(False, f"{type(exc).__name__} is not retryable", BREAKER_IGNORE)


# Arguments of httpx's request() that apply to sending a request, not to building it.
_SEND_OPTIONS = ("auth", "follow_redirects")


class _Prepared(NamedTuple):
    request: httpx.Request
    send_options: dict[str, Any]
    state: MethodState
    classify: Classifier


class _HttpCore(ClientSettings):
    """The checked settings of an HTTP client, and how they shape each request."""

    def prepare(
        self,
        client: httpx.Client | httpx.AsyncClient,
        method: str,
        url: Any,
        timeout: float | None,
        kwargs: dict[str, Any],
        replicas: HttpReplicas | None = None,
    ) -> _Prepared:
        """The request to send, how to send it, the state of its (authority, method) and its
        classifier. ``kwargs`` are httpx's request arguments. With ``replicas`` the state is
        the replica set's, without the service-wide breaker (each replica has its own)."""
        if timeout is not None and not finite_number(timeout):
            raise ValueError(
                "timeout must be a number of seconds (the overall deadline of the call), "
                f"got {timeout!r}"
            )
        send_options = {name: kwargs.pop(name) for name in _SEND_OPTIONS if name in kwargs}
        headers = httpx.Headers(kwargs.pop("headers", None))
        if self.token and "authorization" not in headers:
            headers["authorization"] = f"Bearer {self.token}"
        request = client.build_request(method, url, headers=headers, **kwargs)
        if replicas is None:
            authority = f"{request.url.scheme}://{request.url.netloc.decode()}"
            state = self.runtime.method(self.policy, authority, f"HTTP {request.method}")
        else:
            policy = per_replica_breakers(self.policy)
            state = self.runtime.method(policy, replicas.name, f"HTTP {request.method}")
        idempotent = http_idempotent(request.method, request.headers)
        clock = self.runtime.clock

        def classify(exc: BaseException, capped: bool, left: float) -> Verdict:
            return classify_http(
                exc, idempotent=idempotent, capped=capped, time_left=left, wall_now=clock.time()
            )

        return _Prepared(request, send_options, state, classify)


def _set_attempt_timeout(request: httpx.Request, seconds: float) -> None:
    # httpx reads a request's timeouts from its extensions: each attempt gets its own.
    request.extensions["timeout"] = httpx.Timeout(seconds).as_dict()


_Httpx = TypeVar("_Httpx", httpx.Client, httpx.AsyncClient)


class _PolicyClient(Generic[_Httpx]):
    """What both HTTP clients are built from: the checked settings and the httpx client."""

    _httpx_class: type[_Httpx]

    def __init__(
        self,
        base_url: str = "",
        policy: Policy | None = None,
        *,
        token: str | None = None,
        runtime: Runtime | None = None,
        headers: Mapping[str, str] | None = None,
        **httpx_kwargs: Any,
    ) -> None:
        self._core = _HttpCore(policy, runtime, token)
        self._client: _Httpx = self._httpx_class(base_url=base_url, headers=headers, **httpx_kwargs)


class AsyncHttpClient(_PolicyClient[httpx.AsyncClient]):
    """``httpx.AsyncClient`` with the pkg.clients policy on every request.

    ``AsyncHttpClient(base_url="http://127.0.0.1:8080", policy=..., token=...)``, then
    ``await client.get("/path")``. ``timeout=`` per request is the overall deadline.
    Extra keyword arguments go to ``httpx.AsyncClient`` (e.g. ``transport`` in tests).

    ``replicas``: several replicas of one service (a list of ``ip:port``, ``dns:///name:port``,
    ``file:/path`` or a ``TargetList``): every attempt goes to a replica picked by outlier
    detection, each replica has its own breaker, and one out of rotation is re-admitted as
    soon as ``GET health_path`` answers 2xx (``pkg.clients.http_replicas``). ``base_url``
    then gives the scheme and the ``Host`` header; its host is not dialled.
    """

    _httpx_class = httpx.AsyncClient

    def __init__(
        self,
        base_url: str = "",
        policy: Policy | None = None,
        *,
        replicas: str | Sequence[str] | TargetList | None = None,
        health_path: str = "/health",
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, policy, **kwargs)
        self._replicas: HttpReplicas | None = None
        if replicas is not None:
            scheme = httpx.URL(base_url).scheme or "http"
            core = self._core
            self._replicas = HttpReplicas(
                replicas, core.policy, core.runtime, self._client, scheme, health_path
            )

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the overall deadline of the policy
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request under the policy; returns the final response."""
        pool = self._replicas
        request, send_options, state, classify = self._core.prepare(
            self._client, method, url, timeout, kwargs, pool
        )
        client = self._client
        if pool is not None:
            pooled = pool.attempt_fn(request, send_options, state, classify, RetryableStatus)
            try:
                response: httpx.Response = await call_async(state, timeout, pooled, classify)
            except RetryableStatus as final:
                return final.response
            return response

        async def attempt(attempt_timeout: float) -> httpx.Response:
            _set_attempt_timeout(request, attempt_timeout)
            response = await client.send(request, **send_options)
            if response.status_code in HTTP_RETRYABLE_STATUS:
                await response.aread()
                raise RetryableStatus(response)
            return response

        try:
            return await call_async(state, timeout, attempt, classify)
        except RetryableStatus as final:
            return final.response

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """GET under the policy."""
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """POST under the policy (retried only with an ``Idempotency-Key`` header)."""
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """PUT under the policy."""
        return await self.request("PUT", url, **kwargs)

    async def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """DELETE under the policy."""
        return await self.request("DELETE", url, **kwargs)

    async def aclose(self) -> None:
        """Close the connection pool (and stop health-checking replicas)."""
        if self._replicas is not None:
            await self._replicas.close()
        await self._client.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class HttpClient(_PolicyClient[httpx.Client]):
    """Blocking ``httpx.Client`` with the pkg.clients policy (same arguments as the async one)."""

    _httpx_class = httpx.Client

    def request(
        self, method: str, url: str, *, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request under the policy; returns the final response."""
        request, send_options, state, classify = self._core.prepare(
            self._client, method, url, timeout, kwargs
        )
        client = self._client

        def attempt(attempt_timeout: float) -> httpx.Response:
            _set_attempt_timeout(request, attempt_timeout)
            response = client.send(request, **send_options)
            if response.status_code in HTTP_RETRYABLE_STATUS:
                response.read()
                raise RetryableStatus(response)
            return response

        try:
            return call_sync(state, timeout, attempt, classify)
        except RetryableStatus as final:
            return final.response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """GET under the policy."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """POST under the policy (retried only with an ``Idempotency-Key`` header)."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """PUT under the policy."""
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """DELETE under the policy."""
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
