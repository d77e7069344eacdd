"""Bridge's access map: the role every root field of the GraphQL schema needs (docs/security.md).

The one list of who may ask what. Two checks read it:

- before execution (``schema.FieldAccess``): every root field the selected operation names,
  fragments on the root type included, is checked against the caller's token; one field the
  caller may not use refuses the whole request, nothing runs, and HTTP answers 401 (no token) or
  403 (the token lacks the role) with no ``data`` entry; a WebSocket gets an ``error`` message;
- in the resolvers (``service.Gateway``, ``require``): the same rule again, in depth.

Deny by default: a root field missing here is refused, and tests/bridge/test_field_access.py
fails for any root field of the schema not listed. Introspection (``__schema``, ``__type``,
``__typename``) is public, as the schema itself is (docs/graphql-http.md).

A rule that depends on argument values stays in its resolver, where the values are known:
a tenant ``admin`` may invalidate only its own tenant's tags (``Gateway.invalidate``). The map
admits ``admin`` to ``invalidateCache``; asking for another tenant's tags is a field error.

The check is static: ``@skip`` and ``@include`` are not evaluated, so a field that could run
counts (ask for operator fields in an operation of their own). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql.utilities import get_operation_ast

from api_gateway import errors
from api_gateway.auth import is_anonymous
from pkg.common.auth import OPERATOR as PLATFORM_OPERATOR
from pkg.common.auth import Principal

# The roles of a Bridge JWT's ``roles`` claim that the map names (docs/security.md).
ADMIN = "admin"  # a tenant's administrator (of that tenant only)
OPERATOR = PLATFORM_OPERATOR  # the platform operator: the fleet, routing internals, every cache


@dataclass(frozen=True)
class FieldRule:
    """Who may use a field: anyone, any token (a tenant), or a token holding one of ``roles``."""

    token: bool = False
    roles: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.roles:
            return " or ".join(repr(r) for r in sorted(self.roles))
        return "a bearer token" if self.token else "public"


PUBLIC = FieldRule()
TOKEN = FieldRule(token=True)


def needs(*roles: str) -> FieldRule:
    """A token holding one of ``roles``."""
    if not roles:
        raise ValueError("needs() takes at least one role (use TOKEN for any token)")
    return FieldRule(token=True, roles=frozenset(roles))


# Root fields by ``Type.field`` (GraphQL names).
FIELDS: dict[str, FieldRule] = {
    "Query.me": PUBLIC,
    "Query.route": PUBLIC,  # anonymous callers are limited per address
    # The fleet (node addresses and load) and routing internals: platform operators.
    "Query.nodes": needs(OPERATOR),
    "Query.node": needs(OPERATOR),
    "Query.explainRoute": needs(OPERATOR),
    "Mutation.setNodeMode": needs(OPERATOR),
    # ``admin``: its own tenant's tags only (checked on the values, in Gateway.invalidate).
    "Mutation.invalidateCache": needs(ADMIN, OPERATOR),
    # The caller's own tenant's events: the tenant comes from the token.
    "Subscription.tenantEvents": TOKEN,
}


class AccessDenied(errors.ApiError):
    """A refusal by the access map: UNAUTHENTICATED (HTTP 401) or FORBIDDEN (HTTP 403)."""

    def __init__(self, code: str, message: str, node: FieldNode | None = None) -> None:
        GraphQLError.__init__(self, message, nodes=node, extensions={"code": code})
        self.code = code

    @property
    def http_status(self) -> int:
        return 401 if self.code == errors.UNAUTHENTICATED else 403


def denial(principal: Principal, key: str) -> AccessDenied | None:
    """Why ``principal`` may not use the root field ``key`` (``Type.field``), or None."""
    name = key.rpartition(".")[2]
    if name.startswith("__"):
        return None
    rule = FIELDS.get(key)
    if rule is None:
        return AccessDenied(
            errors.FORBIDDEN, f"{name} is not in Bridge's access map: refused (deny by default)"
        )
    if not rule.token:
        return None
    if is_anonymous(principal):
        wanted = f" with the {rule.describe()} role" if rule.roles else ""
        return AccessDenied(errors.UNAUTHENTICATED, f"{name} needs a bearer token{wanted}")
    if rule.roles and not principal.has_any(rule.roles):
        held = ", ".join(sorted(principal.roles)) or "no role"
        return AccessDenied(
            errors.FORBIDDEN,
            f"{name} needs the {rule.describe()} role (this token of tenant "
            f"{principal.tenant!r} has {held})",
        )
    return None


def require(principal: Principal, key: str) -> str:
    """The caller's tenant if it may use ``key``; raises ``AccessDenied`` otherwise (the
    resolvers' check in depth: the request was already checked before execution)."""
    refused = denial(principal, key)
    if refused is not None:
        raise refused
    return principal.tenant


def root_fields(
    schema: GraphQLSchema, document: DocumentNode, operation_name: str | None
) -> list[tuple[str, FieldNode]]:
    """The root fields (``Type.field`` and node) the selected operation may run: those of its
    selection set and of every fragment it spreads there, however deeply nested. Empty when the
    operation cannot be determined (GraphQL refuses that request itself)."""
    operation = get_operation_ast(document, operation_name)
    if operation is None and operation_name is None:  # Strawberry runs the first one
        operation = next(
            (d for d in document.definitions if isinstance(d, OperationDefinitionNode)), None
        )
    if operation is None:
        return []
    root = schema.get_root_type(operation.operation)
    if root is None:
        return []
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    return [
        (f"{root.name}.{node.name.value}", node)
        for node in _fields(operation.selection_set, fragments, set())
    ]


def _fields(
    selections: SelectionSetNode, fragments: dict[str, FragmentDefinitionNode], seen: set[str]
) -> Iterator[FieldNode]:
    # Every fragment counts whatever its type condition: validation already refused one that
    # cannot apply to the root type, and over-counting can only refuse, never admit.
    for selection in selections.selections:
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _fields(selection.selection_set, fragments, seen)
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            if fragment is not None and name not in seen:
                seen.add(name)
                yield from _fields(fragment.selection_set, fragments, seen)


def check_operation(
    principal: Principal,
    schema: GraphQLSchema,
    document: DocumentNode,
    operation_name: str | None,
) -> list[GraphQLError]:
    """One ``AccessDenied`` per root field of the operation that ``principal`` may not use
    (each with the field's location in the document); empty when it may run."""
    refused: list[GraphQLError] = []
    named: set[str] = set()
    for key, node in root_fields(schema, document, operation_name):
        if key in named:
            continue
        named.add(key)
        why = denial(principal, key)
        if why is not None:
            refused.append(AccessDenied(why.code, why.message, node))
    return refused


def refusal_status(refusals: Iterable[GraphQLError]) -> int | None:
    """The HTTP status for a request refused by the map (401 if any refusal is for a missing
    token, else 403), or None when none of ``refusals`` is the map's."""
    codes = [e.http_status for e in refusals if isinstance(e, AccessDenied)]
    if not codes:
        return None
    return 401 if 401 in codes else 403


__all__ = [
    "ADMIN",
    "FIELDS",
    "OPERATOR",
    "PUBLIC",
    "TOKEN",
    "AccessDenied",
    "FieldRule",
    "check_operation",
    "denial",
    "needs",
    "refusal_status",
    "require",
    "root_fields",
]
