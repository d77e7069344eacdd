"""Fuzzing the public HTTP API: no query, variables, body or token ever yields a 500."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from api_gateway.config import BridgeConfig
from api_gateway.server import BridgeApp
from tests.bridge.fakes import SECRET, FakeFleet, token

KNOWN_CODES = {
    "UNAUTHENTICATED", "FORBIDDEN", "BAD_USER_INPUT", "NOT_FOUND", "RATE_LIMITED",
    "GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED", "QUERY_TOO_DEEP", "QUERY_TOO_LARGE",
    "BAD_REQUEST", "PAYLOAD_TOO_LARGE", "NO_ELIGIBLE_NODE", "BACKEND_UNAVAILABLE",
    "BACKEND_TIMEOUT", "SUBSCRIPTIONS_UNAVAILABLE",
}  # fmt: skip

FRAGMENTS = [
    "{", "}", "(", ")", "query", "mutation", "subscription", "me", "route", "nodes", "node",
    "explainRoute", "setNodeMode", "invalidateCache", "tenantEvents", "id", "mode", "best",
    "nodeId", "urls", "url", "contentId:", '"live/x"', "$v", ":", "ID!", "String", "...", "on",
    "fragment", "F", "Query", "__schema", "types", "name", "__typename", "a:", "DRAINING", "1e999",
    "-1", "null", "[", "]", "@skip(if: true)", "#", "\\u0000", '"', "latitude:", "91",
]  # fmt: skip

queries = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(" ".join),
    st.text(max_size=300),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
tokens = st.one_of(
    st.none(),
    st.text(max_size=200),
    st.sampled_from(
        [
            token(),
            token(roles=["admin"]),
            token(exp_in=-10),
            token(tenant=None),
            token(secret="wrong-secret-wrong-secret-wrong-secret"),
            token(audience="x"),
            "Bearer",
            "Bearer " + "A" * 5000,
        ]
    ),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@pytest.fixture(scope="module")
def client():
    app = BridgeApp(
        BridgeConfig(jwt_hs256_secret=SECRET, anon_burst=10**6, tenant_burst=10**6),
        fleet=FakeFleet(),
    )
    with TestClient(app.asgi, raise_server_exceptions=False) as c:
        yield c


def _check(resp) -> None:
    assert resp.status_code < 500, resp.text
    body = resp.json()
    assert isinstance(body, dict)
    for err in body.get("errors") or []:
        assert err["extensions"]["code"] in KNOWN_CODES, err


def _auth_header(tok: str | None) -> dict[str, bytes]:
    if tok is None:
        return {}
    value = tok if tok.startswith("Bearer") or not tok.isascii() else f"Bearer {tok}"
    # Header values travel as bytes: send whatever bytes the text makes, minus line breaks.
    raw = value.encode("utf-8").replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\x00", b" ")
    return {"Authorization": raw.strip() or b"x"}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=queries, variables=json_values, tok=tokens, op=st.none() | st.text(max_size=10))
def test_any_query_variables_and_token_get_a_clear_answer(client, query, variables, tok, op):
    payload = {"query": query, "variables": variables, "operationName": op}
    resp = client.post("/graphql", content=json.dumps(payload), headers={
        "Content-Type": "application/json", **_auth_header(tok)
    })  # fmt: skip
    _check(resp)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=400), ctype=st.sampled_from(
    ["application/json", "application/graphql", "text/plain", "multipart/form-data", ""]
))  # fmt: skip
def test_any_body_gets_a_clear_answer(client, body, ctype):
    _check(client.post("/graphql", content=body, headers={"Content-Type": ctype}))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.dictionaries(
        st.sampled_from(["query", "variables", "operationName"]), st.text(max_size=80)
    )
)
def test_any_get_query_string_gets_a_clear_answer(client, params):
    _check(client.get("/graphql", params=params, headers={"Accept": "application/json"}))
