"""Foghorn's HTTP side (same process, same event loop): /health, /metrics, /play, /nodes.

Every route is in Foghorn's access map (``api_balancing.access``): /play and the short /health
are public; /nodes, /metrics and the full /health document need an operator credential.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from api_balancing import errors, validation
from api_balancing.fleet import Fleet
from api_balancing.handlers import RoutingService
from api_balancing.limits import address_key, retry_after_header
from pkg.common.auth import ANONYMOUS
from pkg.common.authz import HttpGuard
from pkg.common.forwarded import HEADER as FORWARDED
from pkg.common.health import HealthSource
from pkg.common.httpserver import ops_routes
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 503,
    "FAILED_PRECONDITION": 409,
}


def _error(exc: errors.FoghornError) -> JSONResponse:
    if isinstance(exc, errors.RateLimited):
        return JSONResponse(
            {"error": exc.message, "code": exc.code},
            status_code=429,
            headers={"Retry-After": retry_after_header(exc.retry_after_s)},
        )
    return JSONResponse(
        {"error": exc.message, "field": exc.field, "code": exc.code},
        status_code=_HTTP_STATUS.get(exc.code, 500),
        headers={"Retry-After": "5"} if exc.code == "RESOURCE_EXHAUSTED" else None,
    )


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise errors.InvalidArgument(name, f"{raw[:32]!r} is not a number") from None


def build_app(
    fleet: Fleet, routing: RoutingService, health: HealthSource, guard: HttpGuard
) -> Starlette:
    """The ASGI app; ``health()`` is the replica's health report (/health), ``guard`` applies
    the access map to every route."""

    async def play(request: Request) -> Response:
        """302 to the best node's playback URL. Query: protocol, lat, lon, ip (else client)."""
        try:
            content = request.path_params["content"]
            protocol = request.query_params.get("protocol", "")
            lat, lon = _float_param(request, "lat"), _float_param(request, "lon")
            req = pb.ViewerRouteRequest(content_id=content, protocol=protocol)
            if (lat is None) != (lon is None):
                raise errors.InvalidArgument("lat" if lat is None else "lon", "give lat and lon")
            if lat is not None and lon is not None:
                req.location.latitude, req.location.longitude = lat, lon
            peer = request.client.host if request.client else ""
            # Behind a trusted load balancer the client is the one its X-Forwarded-For names.
            client = routing.proxies.client_address(peer, request.headers.getlist(FORWARDED))
            key = address_key(client)
            if request.state.principal is ANONYMOUS:
                routing.admit(key)
            ip = request.query_params.get("ip") or client
            req.viewer_ip = ip if _is_ip(ip) else ""
            # A redirect issued to this client: counted as pending (capped per client key).
            out = routing.route_viewer(req, redirect_client=key)
        except errors.FoghornError as exc:
            return _error(exc)
        urls = list(out.best.urls)
        if not urls:
            return JSONResponse(
                {"error": f"node {out.best.node_id} offers no viewer protocol", "code": "INTERNAL"},
                status_code=502,
            )
        preferred = next((u for u in urls if u.protocol == "hls"), urls[0])
        return RedirectResponse(
            preferred.url,
            status_code=302,
            headers={"X-Foghorn-Node": out.best.node_id, "Cache-Control": "no-store"},
        )

    async def nodes(request: Request) -> JSONResponse:
        now = fleet.clock.time()
        rows = []
        for rec in sorted(fleet.store.snapshot(), key=lambda r: r.node_id):
            rep = rec.report
            rows.append(
                {
                    "node_id": rec.node_id,
                    "mode": rec.mode.name.lower(),
                    "connected": rec.connected,
                    "stale": fleet.is_stale(rec),
                    "region": rec.identity.region,
                    "base_url": rec.identity.base_url,
                    "roles": sorted(rec.identity.roles),
                    "location": (
                        [rec.identity.location.latitude, rec.identity.location.longitude]
                        if rec.identity.location
                        else None
                    ),
                    "cpu_percent": rep.cpu_percent if rep else None,
                    "ram_ratio": round(rep.ram_used_bytes / rep.ram_max_bytes, 4) if rep else None,
                    "upload_bps": rep.upload_bps if rep else None,
                    "bandwidth_limit_bps": rep.bandwidth_limit_bps if rep else None,
                    "streams": len(rep.streams) if rep else 0,
                    "viewers": sum(s.viewers for s in rep.streams) if rep else 0,
                    "last_report_age_s": round(now - rec.last_report_at, 3) if rep else None,
                    "owner": rec.owner,
                    "version": rec.version,
                }
            )
        return JSONResponse({"count": len(rows), "nodes": rows})

    app = Starlette(
        routes=guard.routes(
            [
                *ops_routes(health, detail_for=guard.is_operator),
                Route("/nodes", nodes),
                Route("/play/{content:path}", play),
            ]
        )
    )
    return app


def _is_ip(value: str) -> bool:
    try:
        validation.ip("ip", value)
    except errors.FoghornError:
        return False
    return bool(value)
