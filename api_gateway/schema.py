"""The GraphQL schema (Strawberry): types, and resolvers that delegate to ``service.Gateway``.

Who may use each root field is in ``api_gateway.access`` (public: ``route`` and ``me``; the
fleet, ``explainRoute`` and ``setNodeMode``: ``operator``), checked before execution by
``FieldAccess`` and again in the resolvers. Byte and bit-rate counts are Floats because GraphQL's
Int is 32-bit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from enum import Enum
from typing import Any

import strawberry
from graphql import FieldNode, GraphQLError, OperationDefinitionNode
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.schema import validate_document
from strawberry.types import Info
from strawberry.types.graphql import OperationType

from api_gateway import access
from api_gateway.backend import Json, RouteQuery
from api_gateway.service import Gateway
from bridge.answers import current_recorder
from pkg.common.auth import ANONYMOUS, Principal


@strawberry.enum
class NodeMode(Enum):
    NORMAL = "NORMAL"
    DRAINING = "DRAINING"
    MAINTENANCE = "MAINTENANCE"


@strawberry.type
class PlaybackUrl:
    protocol: str
    url: str


@strawberry.type
class RouteCandidate:
    node_id: str
    base_url: str
    urls: list[PlaybackUrl]
    score: float
    distance_km: float | None
    region: str


@strawberry.type
class ViewerRoute:
    best: RouteCandidate | None
    fallbacks: list[RouteCandidate]
    viewer_latitude: float | None
    viewer_longitude: float | None
    considered: int


@strawberry.type
class NodeLoad:
    cpu_percent: float
    ram_used_bytes: float
    ram_max_bytes: float
    upload_bps: float
    bandwidth_limit_bps: float
    viewers: int
    streams: int


@strawberry.type
class Node:
    id: strawberry.ID
    mode: NodeMode
    mode_reason: str
    roles: list[str]
    capabilities: list[str]
    base_url: str
    region: str
    latitude: float | None
    longitude: float | None
    capacity: float
    connected: bool
    stale: bool
    last_report_age_s: float | None
    owner_replica: str
    load: NodeLoad | None
    version: float


@strawberry.type
class ScoreParts:
    cpu: float
    ram: float
    bandwidth: float
    geo: float
    stream_bonus: float
    redirect_penalty_bps: float


@strawberry.type
class NodeExplanation:
    node_id: str
    eligible: bool
    rejection: str
    reason: str
    score: float
    parts: ScoreParts | None
    distance_km: float | None
    rank: int


@strawberry.type
class RouteExplanation:
    nodes: list[NodeExplanation]
    weights: str
    viewer_latitude: float | None
    viewer_longitude: float | None


@strawberry.type
class SetModeResult:
    node: Node | None
    delivered: bool
    acked: bool
    ok: bool
    message: str


@strawberry.type
class Viewer:
    anonymous: bool
    name: str
    tenant: str | None
    roles: list[str]


@strawberry.type
class TenantEvent:
    channel: str
    offset: str
    epoch: str
    id: str
    type: str
    tenant: str
    time: float
    source: str
    data: str


# -- dict (cache/backend shape) -> GraphQL objects ---------------------------------------------
def _candidate(d: Json) -> RouteCandidate:
    return RouteCandidate(
        node_id=d["node_id"],
        base_url=d["base_url"],
        urls=[PlaybackUrl(**u) for u in d.get("urls", [])],
        score=d["score"],
        distance_km=d.get("distance_km"),
        region=d.get("region", ""),
    )


def to_route(d: Json) -> ViewerRoute:
    return ViewerRoute(
        best=_candidate(d["best"]) if d.get("best") else None,
        fallbacks=[_candidate(c) for c in d.get("fallbacks", [])],
        viewer_latitude=d.get("viewer_latitude"),
        viewer_longitude=d.get("viewer_longitude"),
        considered=d.get("considered", 0),
    )


def to_node(d: Json) -> Node:
    load = d.get("load")
    return Node(
        id=strawberry.ID(d["id"]),
        mode=NodeMode(d["mode"]) if d.get("mode") in NodeMode.__members__ else NodeMode.NORMAL,
        mode_reason=d.get("mode_reason", ""),
        roles=list(d.get("roles", [])),
        capabilities=list(d.get("capabilities", [])),
        base_url=d.get("base_url", ""),
        region=d.get("region", ""),
        latitude=d.get("latitude"),
        longitude=d.get("longitude"),
        capacity=d.get("capacity", 0),
        connected=d.get("connected", False),
        stale=d.get("stale", False),
        last_report_age_s=d.get("last_report_age_s"),
        owner_replica=d.get("owner_replica", ""),
        load=NodeLoad(**load) if load else None,
        version=d.get("version", 0),
    )


def to_explanation(d: Json) -> RouteExplanation:
    nodes = []
    for n in d.get("nodes", []):
        parts = n.get("parts")
        nodes.append(
            NodeExplanation(
                node_id=n["node_id"],
                eligible=n["eligible"],
                rejection=n.get("rejection", ""),
                reason=n.get("reason", ""),
                score=n.get("score", 0.0),
                parts=ScoreParts(**parts) if parts else None,
                distance_km=n.get("distance_km"),
                rank=n.get("rank", 0),
            )
        )
    return RouteExplanation(
        nodes=nodes,
        weights=d.get("weights", ""),
        viewer_latitude=d.get("viewer_latitude"),
        viewer_longitude=d.get("viewer_longitude"),
    )


# -- resolvers ----------------------------------------------------------------------------------
def _gateway(info: Info[Any, Any]) -> Gateway:
    gateway: Gateway = info.context["gateway"]
    return gateway


def _principal(info: Info[Any, Any]) -> Principal:
    principal: Principal = info.context["principal"]
    return principal


@strawberry.type
class Query:
    @strawberry.field(description="Who the caller is (public).")  # type: ignore[untyped-decorator]
    def me(self, info: Info[Any, Any]) -> Viewer:
        p = _principal(info)
        return Viewer(
            anonymous=not p.tenant, name=p.name, tenant=p.tenant or None, roles=sorted(p.roles)
        )

    @strawberry.field(description="Best edge node and fallbacks for a viewer (public).")  # type: ignore[untyped-decorator]
    async def route(
        self,
        info: Info[Any, Any],
        content_id: str,
        latitude: float | None = None,
        longitude: float | None = None,
        viewer_ip: str = "",
        protocol: str = "",
        max_fallbacks: int = 3,
    ) -> ViewerRoute:
        q = RouteQuery(content_id, latitude, longitude, viewer_ip, protocol, max_fallbacks)
        return to_route(await _gateway(info).route(_principal(info), q))

    @strawberry.field(description="Why each node was ranked or rejected for a viewer.")  # type: ignore[untyped-decorator]
    async def explain_route(
        self,
        info: Info[Any, Any],
        content_id: str,
        latitude: float | None = None,
        longitude: float | None = None,
        viewer_ip: str = "",
        protocol: str = "",
    ) -> RouteExplanation:
        q = RouteQuery(content_id, latitude, longitude, viewer_ip, protocol, 16)
        return to_explanation(await _gateway(info).explain(_principal(info), q))

    @strawberry.field(description="The fleet overview.")  # type: ignore[untyped-decorator]
    async def nodes(
        self, info: Info[Any, Any], mode: NodeMode | None = None, connected_only: bool = False
    ) -> list[Node]:
        found = await _gateway(info).nodes(
            _principal(info), mode.value if mode else None, connected_only
        )
        return [to_node(n) for n in found]

    @strawberry.field(description="One node, or null when it does not exist.")  # type: ignore[untyped-decorator]
    async def node(self, info: Info[Any, Any], id: strawberry.ID) -> Node | None:
        found = await _gateway(info).node(_principal(info), str(id))
        return to_node(found) if found is not None else None


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Set a node's operational mode (operator role).")  # type: ignore[untyped-decorator]
    async def set_node_mode(
        self, info: Info[Any, Any], node_id: strawberry.ID, mode: NodeMode, reason: str = ""
    ) -> SetModeResult:
        r = await _gateway(info).set_node_mode(_principal(info), str(node_id), mode.value, reason)
        return SetModeResult(
            node=to_node(r["node"]) if r.get("node") else None,
            delivered=r.get("delivered", False),
            acked=r.get("acked", False),
            ok=r.get("ok", False),
            message=r.get("message", ""),
        )

    @strawberry.mutation(description="Invalidate cached answers (admin: own tenant; operator: any)")  # type: ignore[untyped-decorator]
    async def invalidate_cache(
        self, info: Info[Any, Any], tenant: str | None = None, tags: list[str] | None = None
    ) -> list[str]:
        return await _gateway(info).invalidate(_principal(info), tenant, tags or [])


@strawberry.type
class Subscription:
    @strawberry.subscription(description="The caller's tenant events, relayed from Signalman.")  # type: ignore[untyped-decorator]
    async def tenant_events(
        self, info: Info[Any, Any], channels: list[str]
    ) -> AsyncGenerator[TenantEvent, None]:
        async for event in _gateway(info).tenant_events(_principal(info), channels):
            yield TenantEvent(**event)


class FieldAccess(SchemaExtension):
    """The access map's check before execution (``api_gateway.access``): a request naming a
    root field its caller may not use is refused whole, as a request error (no ``data``; HTTP
    401/403, a WebSocket ``error`` message), and nothing runs.

    It runs after validation, so an invalid document gets its validation errors, and only a
    valid one is looked into. Errors set here, before Strawberry's own validation step, skip
    that step and stop the request before execution (see ``OperationNameRequired``).
    """

    def on_validate(self) -> Iterator[None]:
        ctx = self.execution_context
        document = ctx.graphql_document
        if document is not None:
            if ctx.pre_execution_errors is None:
                # No validation cache ran before this extension: validate as Strawberry would.
                ctx.pre_execution_errors = validate_document(
                    ctx.schema._schema, document, ctx.validation_rules
                )
            if not ctx.pre_execution_errors:
                refused = access.check_operation(
                    _context_principal(ctx.context),
                    ctx.schema._schema,
                    document,
                    getattr(ctx, "_provided_operation_name", None),
                    ctx.variables,
                )
                if refused:
                    ctx.pre_execution_errors = refused
        yield


def _context_principal(context: Any) -> Principal:
    principal = context.get("principal") if isinstance(context, dict) else None
    return principal if isinstance(principal, Principal) else ANONYMOUS


class OperationNameRequired(SchemaExtension):
    """A document with several operations needs ``operationName`` (GraphQL spec, GetOperation).

    Strawberry takes the first operation's name when none is given, so the first one ran. The
    check sits before validation: setting the errors there skips validation and answers them as
    a request error (execution never starts), on HTTP and WebSocket alike.
    """

    def on_validate(self) -> Iterator[None]:
        ctx = self.execution_context
        document = ctx.graphql_document
        if document is not None and getattr(ctx, "_provided_operation_name", None) is None:
            operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
            if len(operations) > 1:
                ctx.pre_execution_errors = [
                    *(ctx.pre_execution_errors or []),
                    GraphQLError(
                        "Must provide operation name if query contains multiple operations.",
                        extensions={"code": "OPERATION_NAME_REQUIRED"},
                    ),
                ]
        yield


# Top-level query fields whose value is a response-cache read (recorded by ``Gateway``) or a
# function of the caller alone (part of the answer key): a query made only of these may keep its
# whole answer (``bridge.answers``). A new field joins only when the same holds for it.
ANSWER_FIELDS = frozenset({"route", "explainRoute", "nodes", "node", "me", "__typename"})


class KeepableAnswers(SchemaExtension):
    """Tells ``bridge.answers`` not to keep the answer of anything but a plain query over
    ``ANSWER_FIELDS``, or of a request with errors."""

    def on_execute(self) -> Iterator[None]:
        recorder = current_recorder()
        if recorder is not None and not _keepable(self.execution_context):
            recorder.forbid()
        yield
        result = self.execution_context.result
        if recorder is not None and (result is None or result.errors):
            recorder.forbid()


def _keepable(ctx: Any) -> bool:
    document = ctx.graphql_document
    if document is None or ctx.operation_type is not OperationType.QUERY:
        return False
    name = ctx.operation_name
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    chosen = [op for op in operations if name is None or (op.name and op.name.value == name)]
    if len(chosen) != 1:
        return False
    # A fragment spread at the top level could name any field: not looked into, not kept.
    return all(
        isinstance(sel, FieldNode) and sel.name.value in ANSWER_FIELDS
        for sel in chosen[0].selection_set.selections
    )


class BridgeSchema(strawberry.Schema):
    """Strawberry's schema minus its error logging: client mistakes (syntax, validation, bad
    input) are answers, not server errors; real failures are logged where they are masked."""

    def process_errors(self, errors: Any, execution_context: Any = None) -> None:
        return None


def build_schema(
    max_depth: int = 8, max_tokens: int = 2000, max_aliases: int = 30
) -> strawberry.Schema:
    """The schema with its abuse limits (depth, tokens, aliases) and parse/validation caches.

    The depth and alias rules are built once and shared by every request: the validation
    cache keys on the rule classes, so per-request rule classes would make every query miss it
    (that alone was 60% of a cached query's time).
    """
    limit_rules = [
        *QueryDepthLimiter(max_depth=max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=max_aliases).validation_rules,
    ]
    return BridgeSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[
            lambda: AddValidationRules(limit_rules),
            lambda: MaxTokensLimiter(max_token_count=max_tokens),
            # Strawberry shares these LRU caches across instances of the same size.
            lambda: ParserCache(maxsize=512),
            lambda: ValidationCache(maxsize=512),
            # After the validation cache, which overwrites the errors it finds with its own.
            OperationNameRequired,
            # After validation (the cache above) and the operation-name check.
            FieldAccess,
            KeepableAnswers,
        ],
    )
