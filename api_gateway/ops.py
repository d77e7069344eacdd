"""Who may read Bridge's operator surfaces: ``/metrics`` and the full ``/health`` document.

The same rule as Foghorn and Signalman (docs/security.md): the public ``/health`` says only
``{"status": "ok"|"degraded"|"not_serving"}``; ``/metrics`` and the full report need the
operator role. Bridge takes it from either credential an operator holds: a platform token with
the ``operator`` role (``PLATFORM_TOKENS``, what Prometheus and ``./dev up``'s status view send to
every service) or a Bridge JWT whose ``roles`` claim has ``operator``. Refusals have the shape of
the other services': 401 with ``WWW-Authenticate: Bearer`` without a valid token, 403 naming the
missing role.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from api_gateway.auth import AuthError, JwtAuthenticator
from pkg.common.auth import OPERATOR, Authenticator, Principal, bearer_token
from pkg.common.authz import Denial
from pkg.common.health import HealthSource
from pkg.common.httpserver import ops_routes


class OperatorGuard:
    """Decides whether a request carries an operator credential (platform token or JWT)."""

    def __init__(self, jwt: JwtAuthenticator, platform: Authenticator) -> None:
        self._jwt = jwt
        self._platform = platform

    def verdict(self, request: Request, what: str) -> Principal | Denial:
        header = request.headers.get("authorization")
        token = bearer_token(header)
        if token is None:
            return Denial("UNAUTHENTICATED", f"{what} requires a bearer token (operator)")
        if not token:
            return Denial("UNAUTHENTICATED", "authorization is not a bearer token")
        principal = self._platform(token)
        if principal is None and self._jwt.enabled and token.count(".") == 2:
            try:
                principal = self._jwt.authenticate(header)
            except AuthError as exc:
                return Denial("UNAUTHENTICATED", f"invalid token: {exc}")
        if principal is None:
            return Denial("UNAUTHENTICATED", "unknown bearer token")
        if principal.has_role(OPERATOR):
            return principal
        held = ", ".join(sorted(principal.roles)) or "no role"
        return Denial(
            "PERMISSION_DENIED",
            f"{what} requires role operator (credential {principal.name!r} has {held})",
        )

    def routes(self, health: HealthSource) -> list[BaseRoute]:
        """``/health`` (status only; the full report for operators) and ``/metrics``
        (operators only). A token that fails authentication is refused on both (401), as
        Foghorn and Signalman do and as Bridge's GraphQL does: never downgraded to anonymous."""

        async def health_endpoint(request: Request) -> Response:
            verdict = self.verdict(request, "GET /health")
            given = "authorization" in request.headers
            if isinstance(verdict, Denial) and given and verdict.code == "UNAUTHENTICATED":
                return _refusal(verdict)
            report = health()
            if isinstance(verdict, Denial):
                return JSONResponse({"status": report.status.value}, status_code=report.http_status)
            return JSONResponse(report.to_json(), status_code=report.http_status)

        guarded: list[BaseRoute] = [Route("/health", health_endpoint)]
        for route in ops_routes(health):
            if isinstance(route, Route) and route.path == "/metrics":
                guarded.append(Route(route.path, self._require(route.endpoint, "GET /metrics")))
        return guarded

    def _require(
        self, endpoint: Callable[[Request], Awaitable[Response]], what: str
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            verdict = self.verdict(request, what)
            if isinstance(verdict, Denial):
                return _refusal(verdict)
            return await endpoint(request)

        return guarded


def _refusal(denial: Denial) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if denial.http_status == 401 else None
    return JSONResponse(
        {"error": denial.message, "code": denial.code},
        status_code=denial.http_status,
        headers=headers,
    )
