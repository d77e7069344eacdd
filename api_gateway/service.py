"""Bridge's use cases: who may ask what, which answers are cached under which keys and tags.

Resolvers call these methods; they check the caller's rights, go through the shared response
cache and translate backend failures into ``ApiError`` with stable codes.

Who may do what is ``api_gateway.access``'s map (docs/graphql-http.md), already checked before
execution; each use case checks it again (``access.require``), in depth, with the argument
values where the map's rule reads them (a tenant's ``admin`` invalidates only its own tenant's
cached answers, ``operator`` any tag).

Cache keys and tags (see docs/rfcs/bridge-state.md). A key is a kind followed by the JSON array
of its parts, so no choice of tenant, content id or any other argument can make two different
requests share a key:

- ``route:["acme","live/1",...]``  tags ``routing``, ``tenant:{tenant}`` or ``anonymous``
- ``explain:[...]``                tags ``routing``                        (route TTL)
- ``nodes:["ALL",0]``              tags ``nodes``                          (cache TTL)
- ``node:["n1"]``                  tags ``nodes``, ``node:{id}``           (cache TTL; negative)

``setNodeMode`` invalidates ``nodes``, ``node:{id}`` and ``routing`` on every replica.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from api_gateway import access, errors
from api_gateway.auth import is_anonymous
from api_gateway.backend import (
    NODE_MODES,
    BackendError,
    EventsBackend,
    FleetBackend,
    Json,
    RouteQuery,
)
from api_gateway.errors import ApiError
from bridge.answers import Read, current_recorder
from bridge.cache import CachePolicy, CacheResult, ResponseCache
from pkg.common.auth import Principal

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CONTENT = re.compile(r"^[A-Za-z0-9._:/-]{1,256}$")
_TAG = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9._:*-]{1,128}$")


def cache_key(kind: str, *parts: object) -> str:
    """``kind:`` + the JSON array of ``parts``: injective, whatever characters the parts hold."""
    return f"{kind}:{json.dumps(parts, separators=(',', ':'))}"


def _as_api_error(exc: BackendError) -> ApiError:
    extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
    if exc.code == errors.SUBSCRIPTION_LIMIT:
        extra["retryable"] = False  # waiting does not free a slot: closing a subscription does
    return ApiError(exc.code, exc.message, **extra)


class Gateway:
    """The use cases behind the GraphQL schema."""

    def __init__(
        self,
        fleet: FleetBackend,
        events: EventsBackend,
        cache: ResponseCache,
        route_policy: CachePolicy,
    ) -> None:
        self.fleet = fleet
        self.events = events
        self.cache = cache
        self.route_policy = route_policy

    async def _cached(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        tags: Sequence[str],
        policy: CachePolicy | None = None,
    ) -> CacheResult:
        try:
            result = await self.cache.get(key, loader, tags=tags, policy=policy)
        except BackendError as exc:
            raise _as_api_error(exc) from None
        recorder = current_recorder()
        if recorder is not None:  # the request may keep its whole answer (bridge.answers)
            recorder.add(Read(tuple(tags), result.versions, result.fresh_until, result.delta))
        return result

    async def route(self, principal: Principal, query: RouteQuery) -> Json:
        """Best node (plus fallbacks) for a viewer: public, cached per tenant."""
        self._check_route(query)
        tenant = None if is_anonymous(principal) else principal.tenant
        result = await self._cached(
            cache_key("route", tenant, *query.key_parts()),
            lambda: self.fleet.route_viewer(query),
            ["routing", f"tenant:{tenant}" if tenant else "anonymous"],
            self.route_policy,
        )
        return dict(result.value)

    async def explain(self, principal: Principal, query: RouteQuery) -> Json:
        access.require(principal, "Query.explainRoute")
        self._check_route(query)
        result = await self._cached(
            cache_key("explain", *query.key_parts()),
            lambda: self.fleet.explain_route(query),
            ["routing"],
            self.route_policy,
        )
        return dict(result.value)

    async def nodes(
        self, principal: Principal, mode: str | None, connected_only: bool
    ) -> list[Json]:
        access.require(principal, "Query.nodes")
        result = await self._cached(
            cache_key("nodes", mode or "ALL", int(connected_only)),
            lambda: self.fleet.list_nodes(mode, connected_only),
            ["nodes"],
        )
        return list(result.value)

    async def node(self, principal: Principal, node_id: str) -> Json | None:
        """One node, or None when Foghorn says it does not exist (cached negatively)."""
        access.require(principal, "Query.node")
        if not _ID.match(node_id):
            raise ApiError(errors.BAD_USER_INPUT, "id: 1..128 chars of [A-Za-z0-9._:-]", field="id")
        result = await self._cached(
            cache_key("node", node_id),
            lambda: self.fleet.get_node(node_id),
            ["nodes", f"node:{node_id}"],
        )
        return dict(result.value) if result.found else None

    async def set_node_mode(
        self, principal: Principal, node_id: str, mode: str, reason: str
    ) -> Json:
        """Operator only. The change is visible through every replica's cache at once."""
        access.require(principal, "Mutation.setNodeMode")
        if not _ID.match(node_id):
            raise ApiError(
                errors.BAD_USER_INPUT, "nodeId: 1..128 chars of [A-Za-z0-9._:-]", field="nodeId"
            )
        if mode not in NODE_MODES:
            raise ApiError(errors.BAD_USER_INPUT, f"mode must be one of {NODE_MODES}")
        if len(reason) > 512:
            raise ApiError(errors.BAD_USER_INPUT, "reason: at most 512 chars", field="reason")
        try:
            result = await self.fleet.set_node_mode(node_id, mode, reason)
        except BackendError as exc:
            raise _as_api_error(exc) from None
        await self._invalidate(["nodes", f"node:{node_id}", "routing"])
        return result

    async def invalidate(
        self, principal: Principal, tenant: str | None, tags: Sequence[str]
    ) -> list[str]:
        """Invalidate a tenant's entries and/or named tags on every replica.

        ``operator``: any tenant, any tag. A tenant's ``admin``: its own tenant only (the
        ``tenant`` argument, or the tag ``tenant:<own>``); global tags and other tenants are
        refused before anything is invalidated (``access.own_tenant_tags``).
        """
        access.require(principal, "Mutation.invalidateCache", {"tenant": tenant, "tags": tags})
        all_tags = list(dict.fromkeys([*tags, *([f"tenant:{tenant}"] if tenant else [])]))
        if not all_tags:
            raise ApiError(errors.BAD_USER_INPUT, "give a tenant or at least one tag")
        for tag in all_tags:
            if not _TAG.match(tag):
                raise ApiError(errors.BAD_USER_INPUT, f"bad tag {tag[:64]!r}", field="tags")
        await self._invalidate(all_tags)
        return all_tags

    async def _invalidate(self, tags: list[str]) -> None:
        # While Redis is unreachable the cache defers the bump and replays it on recovery.
        await self.cache.invalidate(tags)

    async def tenant_events(self, principal: Principal, channels: list[str]) -> AsyncIterator[Json]:
        """The caller's tenant's events; the tenant comes from the token, never the query."""
        tenant = access.require(principal, "Subscription.tenantEvents")
        if not channels or len(channels) > 32:
            raise ApiError(errors.BAD_USER_INPUT, "channels: 1..32 channel names", field="channels")
        for ch in channels:
            if not _CHANNEL.match(ch):
                raise ApiError(errors.BAD_USER_INPUT, f"bad channel {ch[:64]!r}", field="channels")
        try:
            async for event in self.events.subscribe(tenant, channels):
                yield event
        except BackendError as exc:
            raise _as_api_error(exc) from None

    @staticmethod
    def _check_route(query: RouteQuery) -> None:
        if not _CONTENT.match(query.content_id):
            raise ApiError(
                errors.BAD_USER_INPUT,
                "contentId: 1..256 chars of [A-Za-z0-9._:/-]",
                field="contentId",
            )
        if (query.latitude is None) != (query.longitude is None):
            raise ApiError(errors.BAD_USER_INPUT, "give both latitude and longitude, or neither")
        if query.latitude is not None and not -90 <= query.latitude <= 90:
            raise ApiError(errors.BAD_USER_INPUT, "latitude: -90..90", field="latitude")
        if query.longitude is not None and not -180 <= query.longitude <= 180:
            raise ApiError(errors.BAD_USER_INPUT, "longitude: -180..180", field="longitude")
        if not 0 <= query.max_fallbacks <= 16:
            raise ApiError(errors.BAD_USER_INPUT, "maxFallbacks: 0..16", field="maxFallbacks")
        if len(query.viewer_ip) > 64 or len(query.protocol) > 16:
            raise ApiError(errors.BAD_USER_INPUT, "viewerIp or protocol too long")
