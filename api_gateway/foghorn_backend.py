"""``FleetBackend`` on Foghorn, through the typed client ``pkg.clients.foghorn``.

The client's channel carries the deadline, retries of safe calls, the retry budget, the circuit
breaker and failover across Foghorn replicas. Here we only translate: protobuf replies -> the
JSON-able dicts the cache stores, and gRPC failures -> stable API error codes. An open breaker
answers at once with BACKEND_UNAVAILABLE (the cache may still serve a stale answer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from api_gateway import errors
from api_gateway.backend import BackendError, Json, RouteQuery
from bridge.cache import NotFound
from pkg.clients import Runtime, aio_channel
from pkg.clients.foghorn import FoghornClient, default_policy
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

T = TypeVar("T")

_MODE_NAMES = {
    pb.NODE_MODE_NORMAL: "NORMAL",
    pb.NODE_MODE_DRAINING: "DRAINING",
    pb.NODE_MODE_MAINTENANCE: "MAINTENANCE",
}


def _rejection(value: int) -> str:
    known = value in pb.Rejection.values()
    name = pb.Rejection.Name(value) if known else "REJECTION_UNKNOWN"  # type: ignore[arg-type]
    return name.removeprefix("REJECTION_")


def _km(value: float) -> float | None:
    return None if value < 0 else value


def candidate(c: pb.RouteCandidate) -> Json:
    return {
        "node_id": c.node_id,
        "base_url": c.base_url,
        "urls": [{"protocol": u.protocol, "url": u.url} for u in c.urls],
        "score": c.score,
        "distance_km": _km(c.distance_km),
        "region": c.region,
    }


def node_info(n: pb.NodeInfo) -> Json:
    ident, rep, health = n.identity, n.last_report, n.health
    has_loc = n.identity.HasField("location")
    load = None
    if n.HasField("last_report"):
        load = {
            "cpu_percent": rep.cpu_percent,
            "ram_used_bytes": float(rep.ram_used_bytes),
            "ram_max_bytes": float(rep.ram_max_bytes),
            "upload_bps": float(rep.upload_bps),
            "bandwidth_limit_bps": float(rep.bandwidth_limit_bps),
            "viewers": int(min(sum(s.viewers for s in rep.streams), 2**31 - 1)),
            "streams": len(rep.streams),
        }
    return {
        "id": ident.node_id,
        "mode": _MODE_NAMES.get(n.mode, "NORMAL"),
        "mode_reason": n.mode_reason,
        "roles": list(ident.roles),
        "capabilities": list(ident.capabilities),
        "base_url": ident.base_url,
        "region": ident.region,
        "latitude": ident.location.latitude if has_loc else None,
        "longitude": ident.location.longitude if has_loc else None,
        "capacity": float(ident.capacity),
        "connected": health.connected,
        "stale": health.stale,
        "last_report_age_s": None if health.last_report_age_s < 0 else health.last_report_age_s,
        "owner_replica": health.owner_replica,
        "load": load,
        "version": float(n.version),
    }


def to_backend_error(exc: grpc.RpcError, what: str = "Foghorn") -> BackendError:
    """The one mapping from a gRPC failure to an API error code."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    details = (details or "")[:300]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BackendError(errors.BAD_USER_INPUT, details or "invalid argument")
    if code == grpc.StatusCode.NOT_FOUND:
        return BackendError(errors.NOT_FOUND, details or "not found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and what == "Foghorn":
        # Foghorn's "no node can take this viewer now" (all draining, stale, full...).
        return BackendError(errors.NO_ELIGIBLE_NODE, details or "no eligible node")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendError(errors.BACKEND_TIMEOUT, f"{what} did not answer in time")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return BackendError(
            errors.BACKEND_UNAVAILABLE, f"{what} refused Bridge's credentials (check its token)"
        )
    return BackendError(errors.BACKEND_UNAVAILABLE, f"{what} is unavailable: {details}")


class FoghornFleet:
    """Foghorn replicas as Bridge's fleet backend."""

    def __init__(
        self,
        addresses: Sequence[str],
        timeout_s: float = 2.0,
        token: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._addresses = list(addresses)
        self._credentials = credentials
        self._token = token
        self._timeout_s = timeout_s
        self._client: FoghornClient | None = None
        self._owned_channel: grpc.aio.Channel | None = None
        # Our own runtime, so /health can report the breakers of Foghorn's addresses.
        self.runtime = Runtime()

    @property
    def client(self) -> FoghornClient:
        # Created on first use: a grpc.aio channel belongs to the event loop it was made on,
        # and the server's loop only exists once uvicorn runs.
        if self._client is None:
            channel = aio_channel(
                self._addresses,
                # Short routing attempts + outlier ejection: a hung Foghorn replica is
                # skipped after a few timeouts instead of eating half the viewer queries.
                default_policy(self._timeout_s),
                token=self._token,
                runtime=self.runtime,
                credentials=self._credentials,
            )
            self._client = FoghornClient(
                self._addresses, channel=channel, timeout_s=self._timeout_s
            )
            self._owned_channel = channel
        return self._client

    async def close(self) -> None:
        if self._owned_channel is not None:
            await self._owned_channel.close(None)

    def state(self) -> dict[str, str]:
        """Breaker state per Foghorn address seen so far (``closed``/``open``/``half-open``;
        an open breaker whose probe is due counts as half-open: see ``effective_state``)."""
        return {name: b.effective_state for name, b in self.runtime.breakers.items()}

    async def _call(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except grpc.RpcError as exc:
            raise to_backend_error(exc) from None
        except ValueError as exc:  # the typed client validates its arguments
            raise BackendError(errors.BAD_USER_INPUT, str(exc)) from None

    async def route_viewer(self, query: RouteQuery) -> Json:
        r = await self._call(
            self.client.route_viewer(
                query.content_id,
                lat=query.latitude,
                lon=query.longitude,
                ip=query.viewer_ip,
                protocol=query.protocol,
                max_fallbacks=query.max_fallbacks,
            )
        )
        has_loc = r.HasField("viewer_location")
        return {
            "best": candidate(r.best) if r.HasField("best") and r.best.node_id else None,
            "fallbacks": [candidate(c) for c in r.fallbacks],
            "viewer_latitude": r.viewer_location.latitude if has_loc else None,
            "viewer_longitude": r.viewer_location.longitude if has_loc else None,
            "considered": r.considered,
        }

    async def explain_route(self, query: RouteQuery) -> Json:
        r = await self._call(
            self.client.explain_route(
                query.content_id,
                lat=query.latitude,
                lon=query.longitude,
                ip=query.viewer_ip,
                protocol=query.protocol,
            )
        )
        has_loc = r.HasField("viewer_location")
        nodes: list[Json] = []
        for n in r.nodes:
            parts: dict[str, Any] | None = None
            if n.HasField("parts"):
                p = n.parts
                parts = {
                    "cpu": p.cpu,
                    "ram": p.ram,
                    "bandwidth": p.bandwidth,
                    "geo": p.geo,
                    "stream_bonus": p.stream_bonus,
                    "redirect_penalty_bps": p.redirect_penalty_bps,
                }
            nodes.append(
                {
                    "node_id": n.node_id,
                    "eligible": n.eligible,
                    "rejection": _rejection(n.rejection),
                    "reason": n.reason,
                    "score": n.score,
                    "parts": parts,
                    "distance_km": _km(n.distance_km),
                    "rank": n.rank,
                }
            )
        return {
            "nodes": nodes,
            "weights": r.weights,
            "viewer_latitude": r.viewer_location.latitude if has_loc else None,
            "viewer_longitude": r.viewer_location.longitude if has_loc else None,
        }

    async def list_nodes(self, mode: str | None, connected_only: bool) -> list[Json]:
        found = await self._call(
            self.client.list_nodes(
                mode=mode.lower() if mode else None, connected_only=connected_only
            )
        )
        return [node_info(n) for n in found]

    async def get_node(self, node_id: str) -> Json:
        try:
            return node_info(await self.client.get_node(node_id))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound() from None  # authoritative: cached negatively
            raise to_backend_error(exc) from None

    async def set_node_mode(self, node_id: str, mode: str, reason: str) -> Json:
        # Wait for the node's ack at most half our deadline: the mode change itself is stored
        # either way, and the answer says whether the node acknowledged it.
        r = await self._call(
            self.client.set_mode(
                node_id, mode.lower(), reason=reason, ack_timeout_s=self._timeout_s / 2
            )
        )
        cmd = r.command
        return {
            "node": node_info(r.node) if r.HasField("node") else None,
            "delivered": cmd.delivered,
            "acked": cmd.acked,
            "ok": cmd.ok,
            "message": cmd.message,
        }
