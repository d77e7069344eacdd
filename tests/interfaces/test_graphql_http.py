"""GraphQL over HTTP as the GraphQL Foundation's spec says, checked with the Python ``gql``
client (over httpx) and raw HTTP against a real Bridge, Foghorn and Signalman."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gql import Client, gql
from gql.transport.exceptions import TransportQueryError
from gql.transport.httpx import HTTPXAsyncTransport

from pkg.devstack.servers import CommandProcess, free_port
from tests.bridge.fakes import SECRET, token
from tests.interfaces.conftest import Platform

pytestmark = pytest.mark.integration

GRAPHQL_RESPONSE = "application/graphql-response+json"
TWO_OPERATIONS = "query A { me { name } } query B { me { anonymous } }"


async def test_gql_client_queries_and_reads_error_codes(platform: Platform) -> None:
    transport = HTTPXAsyncTransport(
        url=platform.graphql_url, headers={"Authorization": f"Bearer {token('acme')}"}
    )
    async with Client(transport=transport, fetch_schema_from_transport=True) as session:
        me = await session.execute(gql("{ me { anonymous tenant roles } }"))
        assert me == {"me": {"anonymous": False, "tenant": "acme", "roles": []}}
        # Refused with a 403 whose body is a GraphQL response: gql reads it as query errors.
        with pytest.raises(TransportQueryError) as refused:
            await session.execute(
                gql('mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok } }')
            )
        assert refused.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
        assert "setNodeMode needs the 'operator' role" in refused.value.errors[0]["message"]
        assert refused.value.data is None  # no data entry at all
        with pytest.raises(TransportQueryError) as several:
            await session.execute(gql(TWO_OPERATIONS))
        assert several.value.errors[0]["extensions"]["code"] == "OPERATION_NAME_REQUIRED"
        request = gql(TWO_OPERATIONS)
        request.operation_name = "B"
        named = await session.execute(request)
        assert named == {"me": {"anonymous": False}}


async def test_a_document_with_several_operations_needs_an_operation_name(
    platform: Platform,
) -> None:
    async with httpx.AsyncClient() as http:
        for accept, status in ((GRAPHQL_RESPONSE, 400), ("application/json", 200)):
            r = await http.post(
                platform.graphql_url, json={"query": TWO_OPERATIONS}, headers={"Accept": accept}
            )
            assert r.status_code == status
            assert "data" not in r.json()  # execution never started: no data entry at all
            assert r.json()["errors"][0]["extensions"]["code"] == "OPERATION_NAME_REQUIRED"


async def test_graphql_response_json_answers_request_errors_with_4xx_and_no_data(
    platform: Platform,
) -> None:
    cases = [
        ({"query": "{ me { name } "}, {}, 400, "GRAPHQL_PARSE_FAILED"),
        ({"query": "{ me { nope } }"}, {}, 400, "GRAPHQL_VALIDATION_FAILED"),
        ({"query": "{ me { name } }"}, {"Authorization": "Bearer x.y.z"}, 401, "UNAUTHENTICATED"),
    ]
    async with httpx.AsyncClient() as http:
        for body, headers, status, code in cases:
            r = await http.post(
                platform.graphql_url, json=body, headers={"Accept": GRAPHQL_RESPONSE, **headers}
            )
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"].startswith(GRAPHQL_RESPONSE)
            assert "data" not in r.json() and r.json()["errors"][0]["extensions"]["code"] == code
        # A field error after execution started keeps data (null here: route is non-null) and
        # a 200.
        ok = await http.post(
            platform.graphql_url,
            json={"query": '{ route(contentId: "bad id") { considered } }'},
            headers={"Accept": GRAPHQL_RESPONSE},
        )
        assert ok.status_code == 200 and "data" in ok.json() and ok.json()["data"] is None
        assert ok.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        # Legacy application/json: request errors stay 200 (the spec's SHOULD), still no data.
        legacy = await http.post(platform.graphql_url, json={"query": "{ me { name } "})
        assert legacy.status_code == 200 and legacy.headers["content-type"] == "application/json"
        assert "data" not in legacy.json()


async def test_a_request_the_caller_may_not_issue_is_401_or_403_with_no_data(
    platform: Platform,
) -> None:
    """The spec's "client not permitted to issue the request": 401 without a token, 403 with
    one that lacks the role, for both response media types; nothing ran."""
    mutation = 'mutation { setNodeMode(nodeId: "http-n1", mode: DRAINING) { ok } }'
    cases = [
        (None, "{ nodes { id } }", 401, "UNAUTHENTICATED"),
        (token("acme", ["admin"]), "{ me { name } nodes { id } }", 403, "FORBIDDEN"),
        (token("acme", ["admin"]), mutation, 403, "FORBIDDEN"),
    ]
    async with httpx.AsyncClient() as http:
        for tok, query, status, code in cases:
            for accept in (GRAPHQL_RESPONSE, "application/json"):
                headers = {"Accept": accept}
                if tok:
                    headers["Authorization"] = f"Bearer {tok}"
                r = await http.post(platform.graphql_url, json={"query": query}, headers=headers)
                assert r.status_code == status, (query, accept, r.text)
                assert r.headers["content-type"].startswith(accept)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert "data" not in r.json()
                error = r.json()["errors"][0]
                assert error["extensions"]["code"] == code
                assert "'operator' role" in error["message"], error


async def test_an_unacceptable_accept_header_is_406(platform: Platform) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            platform.graphql_url,
            json={"query": "{ me { name } }"},
            headers={"Accept": "application/xml"},
        )
        assert r.status_code == 406
        assert r.json()["errors"][0]["extensions"]["code"] == "NOT_ACCEPTABLE"
        for accept in ("*/*", "application/json;q=0.5, application/graphql-response+json"):
            assert (
                await http.post(
                    platform.graphql_url,
                    json={"query": "{ me { name } }"},
                    headers={"Accept": accept},
                )
            ).status_code == 200


@pytest.fixture
def strict_bridge(tmp_path: Path) -> Iterator[int]:
    """A Bridge alone with a tiny anonymous budget: 2 requests, then one every 4 s."""
    port = free_port()
    proc = CommandProcess(
        "bridge-strict",
        [sys.executable, "-m", "api_gateway", "--port", str(port), "--id", "strict"],
        run_dir=tmp_path / "bridge",
        port=port,
        env={
            "BRIDGE_JWT_HS256_SECRET": SECRET,
            "BRIDGE_ANON_BURST": "2",
            "BRIDGE_ANON_RATE": "0.25",
        },
    )
    proc.start()
    try:
        yield port
    finally:
        proc.stop(timeout=5)


async def test_rate_limit_headers_agree_with_retry_after(strict_bridge: int) -> None:
    url = f"http://127.0.0.1:{strict_bridge}/graphql"
    async with httpx.AsyncClient() as http:
        replies = [await http.post(url, json={"query": "{ me { name } }"}) for _ in range(3)]
    limited = replies[-1]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert limited.headers["retry-after"] == limited.headers["x-ratelimit-reset"]
    assert 1 <= int(limited.headers["retry-after"]) <= 4  # one token at 0.25/s
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert "data" not in limited.json()
    assert limited.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
