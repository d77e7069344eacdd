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

A rule may also depend on argument values (``FieldRule.values``): a tenant ``admin`` may
invalidate only its own tenant's tags. The check before execution reads the values the
operation gives (literals and coerced variables), so an ``admin`` naming another tenant's or a
global tag is refused like a missing role: 403, nothing runs. The resolver passes the same
values to ``require``; a caller the value rule applies to whose values are not given is refused.

The check is static: ``@skip`` and ``@include`` are not evaluated, so a field that could run
counts (ask for operator fields in an operation of their own). No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql.execution.values import VariableValues, get_argument_values, get_variable_values
from graphql.utilities import get_operation_ast

from api_gateway import errors
from api_gateway.auth import is_anonymous
from pkg.common.auth import OPERATOR as PLATFORM_OPERATOR
from pkg.common.auth import Principal

# The roles of a Bridge JWT's ``roles`` claim that the map names (docs/security.md).
ADMIN = "admin"  # a tenant's administrator (of that tenant only)
OPERATOR = PLATFORM_OPERATOR  # the platform operator: the fleet, routing internals, every cache


# Why a caller may not pass these argument values (a sentence naming what was wrong), or None.
ValueRule = Callable[[Principal, Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class FieldRule:
    """Who may use a field: anyone, any token (a tenant), or a token holding one of ``roles``;
    ``values`` further limits the arguments of callers holding none of ``unlimited``."""

    token: bool = False
    roles: frozenset[str] = frozenset()
    values: ValueRule | None = None
    unlimited: frozenset[str] = frozenset()

    def limits_values(self, principal: Principal) -> bool:
        """Whether ``values`` applies to ``principal``: it holds a role of the rule (else the
        role refuses it) and none of ``unlimited``."""
        return (
            self.values is not None
            and not is_anonymous(principal)
            and principal.has_any(self.roles)
            and not principal.has_any(self.unlimited)
        )

    def describe(self) -> str:
        if self.roles:
            return " or ".join(repr(r) for r in sorted(self.roles))
        return "a bearer token" if self.token else "public"


PUBLIC = FieldRule()
TOKEN = FieldRule(token=True)


def needs(*roles: str, values: ValueRule | None = None, unlimited: Iterable[str] = ()) -> FieldRule:
    """A token holding one of ``roles``; with ``values``, only the argument values it allows
    unless the token holds one of ``unlimited``."""
    if not roles:
        raise ValueError("needs() takes at least one role (use TOKEN for any token)")
    return FieldRule(
        token=True, roles=frozenset(roles), values=values, unlimited=frozenset(unlimited)
    )


def own_tenant_tags(principal: Principal, arguments: Mapping[str, Any]) -> str | None:
    """``invalidateCache`` for a tenant's ``admin``: its own tenant (``tenant`` or the tag
    ``tenant:<own>``) and nothing else, neither another tenant's tags nor global ones."""
    own = f"tenant:{principal.tenant}"
    tenant = arguments.get("tenant")
    named = [*(arguments.get("tags") or []), *([f"tenant:{tenant}"] if tenant else [])]
    foreign = [str(tag) for tag in named if tag != own]
    if not foreign:
        return None
    return (
        f"a tenant admin may invalidate only {own}; {foreign[0][:64]!r} needs the {OPERATOR!r} role"
    )


# Root fields by ``Type.field`` (GraphQL names).
FIELDS: dict[str, FieldRule] = {
    "Query.me": PUBLIC,
    "Query.route": PUBLIC,  # anonymous callers are limited per address
    # The fleet (node addresses and load) and routing internals: platform operators.
    "Query.nodes": needs(OPERATOR),
    "Query.node": needs(OPERATOR),
    "Query.explainRoute": needs(OPERATOR),
    "Mutation.setNodeMode": needs(OPERATOR),
    # ``admin``: its own tenant's tags only (checked on the argument values).
    "Mutation.invalidateCache": needs(
        ADMIN, OPERATOR, values=own_tenant_tags, unlimited=[OPERATOR]
    ),
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


def denial(
    principal: Principal, key: str, arguments: Mapping[str, Any] | None = None
) -> AccessDenied | None:
    """Why ``principal`` may not use the root field ``key`` (``Type.field``) with
    ``arguments`` (its argument values; None: not known), or None."""
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
    if rule.values is not None and rule.limits_values(principal):
        # Deny by default: values that were not given cannot be shown to be allowed.
        why = (
            rule.values(principal, arguments)
            if arguments is not None
            else "its argument values were not checked"
        )
        if why is not None:
            return AccessDenied(errors.FORBIDDEN, f"{name}: {why}")
    return None


def require(principal: Principal, key: str, arguments: Mapping[str, Any] | None = None) -> str:
    """The caller's tenant if it may use ``key`` with ``arguments``; raises ``AccessDenied``
    otherwise (the resolvers' check in depth: the request was already checked before
    execution)."""
    refused = denial(principal, key, arguments)
    if refused is not None:
        raise refused
    return principal.tenant


def root_fields(
    schema: GraphQLSchema, document: DocumentNode, operation_name: str | None
) -> list[tuple[str, FieldNode]]:
    """The root fields (``Type.field`` and node) the selected operation may run: those of its
    selection set and of every fragment it spreads there, however deeply nested. Empty when the
    operation cannot be determined (GraphQL refuses that request itself)."""
    operation = _operation(document, operation_name)
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


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    operation = get_operation_ast(document, name)
    if operation is None and name is None:  # Strawberry runs the first one
        operation = next(
            (d for d in document.definitions if isinstance(d, OperationDefinitionNode)), None
        )
    return operation


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
    variables: Mapping[str, Any] | None = None,
) -> list[GraphQLError]:
    """One ``AccessDenied`` per root field of the operation that ``principal`` may not use,
    by role or, for a field whose rule limits values, with the argument values it is given
    (each with the field's location in the document); empty when it may run.

    Variables the operation cannot coerce come back as GraphQL's own errors (a request error
    either way: nothing runs)."""
    refused: list[GraphQLError] = []
    named: set[str] = set()
    coerced: VariableValues | None = None
    for key, node in root_fields(schema, document, operation_name):
        rule = FIELDS.get(key)
        arguments: dict[str, Any] | None = None
        if rule is not None and rule.limits_values(principal):  # each use, with its values
            if coerced is None:
                found = _variables(schema, document, operation_name, variables)
                if isinstance(found, list):
                    return found
                coerced = found
            arguments = _arguments(schema, key, node, coerced)
        elif key in named:
            continue
        named.add(key)
        why = denial(principal, key, arguments)
        if why is not None and all(e.message != why.message for e in refused):
            refused.append(AccessDenied(why.code, why.message, node))
    return refused


def _variables(
    schema: GraphQLSchema,
    document: DocumentNode,
    operation_name: str | None,
    variables: Mapping[str, Any] | None,
) -> VariableValues | list[GraphQLError]:
    # The same coercion execution does next (graphql-core's ExecutionContext.build).
    operation = _operation(document, operation_name)
    definitions = operation.variable_definitions if operation is not None else ()
    return get_variable_values(schema, definitions or (), dict(variables or {}))


def _arguments(
    schema: GraphQLSchema, key: str, node: FieldNode, variables: VariableValues
) -> dict[str, Any] | None:
    type_name, _, field_name = key.partition(".")
    root = schema.get_type(type_name)
    field = root.fields.get(field_name) if isinstance(root, GraphQLObjectType) else None
    if field is None:
        return None
    try:
        return get_argument_values(field, node, variables)
    except GraphQLError:
        return None  # not readable: refused (deny by default); validation saw the literals


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
    "own_tenant_tags",
    "refusal_status",
    "require",
    "root_fields",
]
