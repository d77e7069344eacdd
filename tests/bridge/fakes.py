"""Test doubles for Bridge's backends (the HTTP path, the cache and the schema are all real)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt

from api_gateway.backend import BackendError, Json, RouteQuery
from bridge.cache import NotFound

SECRET = "test-secret-0123456789-0123456789"
ISSUER = "platform"
AUDIENCE = "bridge"


def token(
    tenant: str | None = "acme",
    roles: list[str] | None = None,
    *,
    exp_in: float = 300,
    secret: str = SECRET,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    alg: str = "HS256",
    key: Any = None,
) -> str:
    claims: dict[str, Any] = {
        "sub": "user-1",
        "iss": issuer,
        "aud": audience,
        "exp": int(time.time() + exp_in),
        "roles": roles or [],
    }
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, key if key is not None else secret, algorithm=alg)


def node(node_id: str, mode: str = "NORMAL") -> Json:
    return {
        "id": node_id,
        "mode": mode,
        "mode_reason": "",
        "roles": ["edge"],
        "capabilities": ["hls"],
        "base_url": f"http://{node_id}.example:8080",
        "region": "eu-west",
        "latitude": 50.0,
        "longitude": 4.0,
        "capacity": 1000,
        "connected": True,
        "stale": False,
        "last_report_age_s": 1.0,
        "owner_replica": "f1",
        "load": None,
        "version": 1,
    }


class FakeFleet:
    """An in-memory fleet that counts calls per method, can be slowed down or made to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.nodes: dict[str, Json] = {"n1": node("n1"), "n2": node("n2")}
        self.calls: dict[str, int] = {}
        self.delay = delay
        self.down = False

    async def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise BackendError("BACKEND_UNAVAILABLE", "Foghorn is unavailable: test")

    async def route_viewer(self, query: RouteQuery) -> Json:
        await self._enter("route_viewer")
        best = {
            "node_id": "n1",
            "base_url": "http://n1.example:8080",
            "urls": [{"protocol": "hls", "url": f"http://n1.example:8080/{query.content_id}.m3u8"}],
            "score": 0.9,
            "distance_km": 10.0,
            "region": "eu-west",
        }
        return {"best": best, "fallbacks": [], "considered": len(self.nodes)}

    async def explain_route(self, query: RouteQuery) -> Json:
        await self._enter("explain_route")
        return {"nodes": [], "weights": "cpu=500"}

    async def list_nodes(self, mode: str | None, connected_only: bool) -> list[Json]:
        await self._enter("list_nodes")
        return [n for n in self.nodes.values() if mode is None or n["mode"] == mode]

    async def get_node(self, node_id: str) -> Json:
        await self._enter("get_node")
        if node_id not in self.nodes:
            raise NotFound()
        return dict(self.nodes[node_id])

    async def set_node_mode(self, node_id: str, mode: str, reason: str) -> Json:
        await self._enter("set_node_mode")
        if node_id not in self.nodes:
            raise BackendError("NOT_FOUND", f"node {node_id!r} not found", field="nodeId")
        self.nodes[node_id] = {**self.nodes[node_id], "mode": mode, "mode_reason": reason}
        return {"node": self.nodes[node_id], "delivered": True, "acked": True, "ok": True}

    def state(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        pass


class FakeEvents:
    """Yields the given events for any tenant subscription, tagged with the caller's tenant."""

    def __init__(self, events: list[Json] | None = None) -> None:
        self.events = events or []
        self.subscribed: list[tuple[str, list[str]]] = []

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        self.subscribed.append((tenant, channels))
        for e in self.events:
            yield {**e, "tenant": tenant}

    async def close(self) -> None:
        pass
