"""What Bridge needs from its backends, as Protocols the service layer depends on.

``FleetBackend`` is Foghorn (routing, node overview, node admin); ``EventsBackend`` is Signalman
(a tenant's event stream). Values are plain JSON-able dicts in the GraphQL field names, because
they go through the shared cache as JSON. Implementations translate transport failures into
``BackendError`` with a stable code and an authoritative "no such thing" into
``bridge.cache.NotFound`` (which the cache stores negatively).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from api_gateway import errors

Json = dict[str, Any]

NODE_MODES = ("NORMAL", "DRAINING", "MAINTENANCE")


class BackendError(Exception):
    """A backend call failed; ``code`` is one of the stable API error codes."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def unavailable(what: str, detail: str = "") -> BackendError:
    text = f"{what} is unavailable" + (f": {detail}" if detail else "")
    return BackendError(errors.BACKEND_UNAVAILABLE, text)


@dataclass(frozen=True)
class RouteQuery:
    """A viewer routing question: which node should serve ``content_id`` to this viewer?"""

    content_id: str
    latitude: float | None = None
    longitude: float | None = None
    viewer_ip: str = ""
    protocol: str = ""
    max_fallbacks: int = 3

    def key_parts(self) -> tuple[str | int | None, ...]:
        """What identifies the answer, for a cache key (``service.cache_key`` encodes it)."""
        # Locations are rounded to ~1 km: viewers that close get the same answer from the cache.
        lat = None if self.latitude is None else f"{self.latitude:.2f}"
        lon = None if self.longitude is None else f"{self.longitude:.2f}"
        return (self.content_id, lat, lon, self.viewer_ip, self.protocol, self.max_fallbacks)


class FleetBackend(Protocol):
    async def route_viewer(self, query: RouteQuery) -> Json: ...

    async def explain_route(self, query: RouteQuery) -> Json: ...

    async def list_nodes(self, mode: str | None, connected_only: bool) -> list[Json]: ...

    async def get_node(self, node_id: str) -> Json:
        """The node, or raises ``bridge.cache.NotFound``."""
        ...

    async def set_node_mode(self, node_id: str, mode: str, reason: str) -> Json: ...

    def state(self) -> dict[str, str]:
        """Breaker state per backend address (``closed``/``open``/``half-open``), for health."""
        ...

    async def close(self) -> None: ...


class EventsBackend(Protocol):
    def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        """The tenant's events on ``channels`` as they happen (dicts in GraphQL field names)."""
        ...

    async def close(self) -> None: ...


class NoEvents:
    """The events backend when no Signalman is configured: every subscription gets a clear error."""

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        raise BackendError(
            errors.SUBSCRIPTIONS_UNAVAILABLE,
            "event subscriptions are not available: no Signalman is configured "
            "(set BRIDGE_SIGNALMAN_ADDRESSES)",
        )
        yield {}  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        pass


class NoFleet:
    """The fleet backend when no Foghorn is configured: every call gets a clear error."""

    def _fail(self) -> BackendError:
        return unavailable("Foghorn", "no Foghorn is configured (set BRIDGE_FOGHORN_ADDRESSES)")

    async def route_viewer(self, query: RouteQuery) -> Json:
        raise self._fail()

    async def explain_route(self, query: RouteQuery) -> Json:
        raise self._fail()

    async def list_nodes(self, mode: str | None, connected_only: bool) -> list[Json]:
        raise self._fail()

    async def get_node(self, node_id: str) -> Json:
        raise self._fail()

    async def set_node_mode(self, node_id: str, mode: str, reason: str) -> Json:
        raise self._fail()

    def state(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        pass
