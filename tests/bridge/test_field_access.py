"""Bridge's access map (``api_gateway.access``): every root field listed, and the static check
of an operation finds each root field it names, fragments included (pure logic, no I/O)."""

from __future__ import annotations

import pytest
from graphql import parse

from api_gateway import access
from api_gateway.schema import build_schema
from pkg.common.auth import ANONYMOUS, Principal

SCHEMA = build_schema()._schema
USER = Principal("u", tenant="acme", roles=frozenset({"user"}))
ADMIN = Principal("a", tenant="acme", roles=frozenset({"admin"}))
OPERATOR = Principal("o", tenant="ops", roles=frozenset({"operator"}))


def test_every_root_field_of_the_schema_is_in_the_access_map_and_nothing_else() -> None:
    served = {
        f"{root.name}.{name}"
        for root in (SCHEMA.query_type, SCHEMA.mutation_type, SCHEMA.subscription_type)
        if root is not None
        for name in root.fields
    }
    assert served == set(access.FIELDS)


def test_a_field_missing_from_the_map_is_refused_even_to_an_operator() -> None:
    refused = access.denial(OPERATOR, "Mutation.dropEverything")
    assert refused is not None and refused.code == "FORBIDDEN"
    assert "dropEverything" in refused.message and "deny by default" in refused.message


def keys(query: str, operation: str | None = None) -> list[str]:
    return [k for k, _ in access.root_fields(SCHEMA, parse(query), operation)]


@pytest.mark.parametrize(
    "query",
    [
        'mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }',
        'mutation { ...M } fragment M on Mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }',  # noqa: E501
        'mutation { ... on Mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } } }',
        "mutation { ... { ...M } } fragment M on Mutation { ...N } "
        'fragment N on Mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }',
        'mutation { m: setNodeMode(nodeId: "n1", mode: DRAINING) @skip(if: true) { ok } }',
    ],
)
def test_root_fields_are_found_through_aliases_fragments_and_directives(query: str) -> None:
    assert keys(query) == ["Mutation.setNodeMode"]


def test_only_the_selected_operation_counts() -> None:
    doc = "{ me { name } } query Fleet { nodes { id } }"
    assert keys("query A { me { name } } query B { nodes { id } }", "A") == ["Query.me"]
    assert keys("query A { me { name } } query B { nodes { id } }", "B") == ["Query.nodes"]
    assert keys(doc, "Nope") == []  # GraphQL refuses an unknown operation itself


def test_anonymous_callers_are_unauthenticated_for_each_field_that_needs_a_token() -> None:
    refused = access.check_operation(
        ANONYMOUS, SCHEMA, parse('{ me { name } nodes { id } node(id: "x") { id } }'), None
    )
    assert [(e.extensions or {}).get("code") for e in refused] == ["UNAUTHENTICATED"] * 2
    assert "nodes needs a bearer token with the 'operator' role" in refused[0].message
    assert refused[0].locations is not None and refused[0].locations[0].line == 1
    assert access.refusal_status(refused) == 401


def test_a_token_without_the_role_is_forbidden_naming_the_field_and_role() -> None:
    refused = access.check_operation(
        ADMIN, SCHEMA, parse('mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }'), None
    )
    assert len(refused) == 1 and (refused[0].extensions or {}).get("code") == "FORBIDDEN"
    assert refused[0].message.startswith("setNodeMode needs the 'operator' role")
    assert access.refusal_status(refused) == 403


def test_public_introspection_and_allowed_fields_pass() -> None:
    public = '{ __typename __schema { queryType { name } } me { name } route(contentId: "x") { considered } }'  # noqa: E501
    assert access.check_operation(ANONYMOUS, SCHEMA, parse(public), None) == []
    fleet = '{ nodes { id } explainRoute(contentId: "x") { weights } }'
    assert access.check_operation(OPERATOR, SCHEMA, parse(fleet), None) == []
    # invalidateCache admits an admin for its own tenant (the values are checked too).
    own = 'mutation { invalidateCache(tenant: "acme") }'
    assert access.check_operation(ADMIN, SCHEMA, parse(own), None) == []
    assert access.refusal_status(access.check_operation(USER, SCHEMA, parse(own), None)) == 403
    sub = 'subscription { tenantEvents(channels: ["a"]) { id } }'
    assert access.check_operation(USER, SCHEMA, parse(sub), None) == []
    assert access.refusal_status(access.check_operation(ANONYMOUS, SCHEMA, parse(sub), None)) == 401


def test_the_resolvers_check_the_same_map_in_depth() -> None:
    with pytest.raises(access.AccessDenied) as refused:
        access.require(ADMIN, "Mutation.setNodeMode")
    assert refused.value.http_status == 403
    assert access.require(OPERATOR, "Mutation.setNodeMode") == "ops"


@pytest.mark.parametrize(
    ("query", "variables", "named"),
    [
        ('mutation { invalidateCache(tenant: "globex") }', None, "'tenant:globex'"),
        ('mutation { invalidateCache(tags: ["tenant:globex"]) }', None, "'tenant:globex'"),
        ('mutation { invalidateCache(tags: ["routing"]) }', None, "'routing'"),
        ('mutation { invalidateCache(tenant: "acme", tags: ["nodes"]) }', None, "'nodes'"),
        ("mutation($t: String) { invalidateCache(tenant: $t) }", {"t": "globex"}, "'tenant:globex'"),  # noqa: E501
        ("mutation($g: [String!]) { invalidateCache(tags: $g) }", {"g": ["routing"]}, "'routing'"),
        # Beside an allowed use of the same field, through an alias and a fragment.
        ('mutation { a: invalidateCache(tenant: "acme") ...F } '
         'fragment F on Mutation { b: invalidateCache(tenant: "globex") }', None, "'tenant:globex'"),  # noqa: E501
    ],
)  # fmt: skip
def test_a_tenant_admin_naming_another_tenants_or_global_tags_is_forbidden(
    query: str, variables: dict[str, object] | None, named: str
) -> None:
    refused = access.check_operation(ADMIN, SCHEMA, parse(query), None, variables)
    assert access.refusal_status(refused) == 403 and len(refused) == 1
    message = refused[0].message
    assert message.startswith("invalidateCache: a tenant admin may invalidate only tenant:acme")
    assert named in message and "'operator' role" in message
    # The operator may; the admin may name its own tenant, by literal or variable.
    assert access.check_operation(OPERATOR, SCHEMA, parse(query), None, variables) == []
    own = "mutation($t: String, $g: [String!]) { invalidateCache(tenant: $t, tags: $g) }"
    mine = {"t": "acme", "g": ["tenant:acme"]}
    assert access.check_operation(ADMIN, SCHEMA, parse(own), None, mine) == []


def test_variables_that_do_not_coerce_are_graphqls_own_request_error() -> None:
    query = "mutation($g: [String!]!) { invalidateCache(tags: $g) }"
    refused = access.check_operation(ADMIN, SCHEMA, parse(query), None, {"g": [1, None]})
    assert refused and access.refusal_status(refused) is None  # not the map's: no 403
    assert "$g" in refused[0].message


def test_the_resolvers_check_argument_values_in_depth_and_refuse_values_not_given() -> None:
    key = "Mutation.invalidateCache"
    with pytest.raises(access.AccessDenied, match="'tenant:globex' needs the 'operator' role"):
        access.require(ADMIN, key, {"tenant": "globex", "tags": []})
    with pytest.raises(access.AccessDenied, match="argument values were not checked"):
        access.require(ADMIN, key)
    assert access.require(ADMIN, key, {"tenant": None, "tags": ["tenant:acme"]}) == "acme"
    assert access.require(OPERATOR, key) == "ops"  # the operator's values are not limited
