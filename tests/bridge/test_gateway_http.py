"""Bridge's public HTTP API in process (embedded mode): schema, auth, errors, limits, health."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api_gateway.access import AccessDenied
from api_gateway.config import BridgeConfig
from api_gateway.server import BridgeApp
from pkg.common.auth import Principal
from pkg.common.telemetry import setup_metrics
from tests.bridge.fakes import SECRET, FakeEvents, FakeFleet, token

NODE_Q = "query($id: ID!) { node(id: $id) { id mode } }"


def make_client(fleet=None, events=None, **cfg) -> tuple[TestClient, FakeFleet]:
    fleet = fleet or FakeFleet()
    cfg.setdefault("jwt_hs256_secret", SECRET)
    config = BridgeConfig(**cfg)
    app = BridgeApp(config, fleet=fleet, events=events)
    return TestClient(app.asgi), fleet


@pytest.fixture
def client():
    c, fleet = make_client()
    with c:
        c.fleet = fleet
        yield c


def gql(client, query, variables=None, tok=None, headers=None, **kw):
    headers = dict(headers or {})
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    return client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=headers, **kw
    )


def codes(resp) -> list[str]:
    return [e["extensions"]["code"] for e in resp.json().get("errors", [])]


def test_anonymous_callers_may_ask_who_they_are_and_route_a_viewer(client):
    me = gql(client, "{ me { anonymous tenant } }")
    assert me.status_code == 200
    assert me.json()["data"]["me"] == {"anonymous": True, "tenant": None}
    route = gql(client, '{ route(contentId: "live/cats") { best { nodeId urls { url } } } }')
    assert route.json()["data"]["route"]["best"]["nodeId"] == "n1"
    assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(route.headers)


def test_anonymous_callers_get_no_private_fields(client):
    resp = gql(client, "{ nodes { id } }")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert "data" not in resp.json() and codes(resp) == ["UNAUTHENTICATED"]
    assert client.fleet.calls.get("list_nodes") is None


def test_a_token_gives_the_tenant_and_roles(client):
    resp = gql(
        client, "{ me { anonymous tenant roles } nodes { id } }", tok=token("acme", ["operator"])
    )
    data = resp.json()["data"]
    assert data["me"] == {"anonymous": False, "tenant": "acme", "roles": ["operator"]}
    assert sorted(n["id"] for n in data["nodes"]) == ["n1", "n2"]


def test_repeated_queries_are_served_from_the_cache(client):
    tok = token(roles=["operator"])
    for _ in range(3):
        assert gql(client, NODE_Q, {"id": "n1"}, tok=tok).json()["data"]["node"]["id"] == "n1"
    assert client.fleet.calls["get_node"] == 1


def test_an_unknown_node_is_null_and_cached_negatively(client):
    tok = token(roles=["operator"])
    for _ in range(3):
        resp = gql(client, NODE_Q, {"id": "ghost"}, tok=tok)
        assert resp.json() == {"data": {"node": None}}
    assert client.fleet.calls["get_node"] == 1


def test_set_node_mode_needs_the_operator_role(client):
    m = 'mutation { setNodeMode(nodeId: "n1", mode: DRAINING) { ok node { mode } } }'
    for tok, status, code in (
        (None, 401, "UNAUTHENTICATED"),
        (token(roles=["viewer"]), 403, "FORBIDDEN"),
        (token(roles=["admin"]), 403, "FORBIDDEN"),
    ):
        for accept in ("application/json", "application/graphql-response+json"):
            resp = gql(client, m, tok=tok, headers={"Accept": accept})
            assert resp.status_code == status, (accept, resp.text)
            assert resp.headers["content-type"].startswith(accept)
            assert "data" not in resp.json() and codes(resp) == [code]
            assert "setNodeMode" in resp.json()["errors"][0]["message"]
            assert "'operator'" in resp.json()["errors"][0]["message"]
            # Charged like any request (docs/graphql-http.md, "Rate limits").
            assert "x-ratelimit-remaining" in resp.headers
    assert client.fleet.calls.get("set_node_mode") is None


@pytest.mark.parametrize(
    "query",
    [
        "{ me { name } nodes { id } }",  # one forbidden field refuses the whole request
        "query Fleet { ...F } fragment F on Query { nodes { id } }",
        '{ ... on Query { me { name } ... { node(id: "n1") { id } } } }',
        'mutation { invalidateCache(tags: ["tenant:acme"]) '
        'm: setNodeMode(nodeId: "n1", mode: MAINTENANCE) { ok } }',
    ],
)
def test_a_forbidden_root_field_anywhere_refuses_the_request_before_anything_runs(client, query):
    resp = gql(client, query, tok=token(roles=["admin"]), headers={"Accept": "application/json"})
    assert resp.status_code == 403 and "data" not in resp.json(), resp.text
    assert resp.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert codes(resp) == ["FORBIDDEN"]
    assert client.fleet.calls == {}  # not even the allowed fields ran
    # The operator may run each of them.
    assert gql(client, query, tok=token(roles=["operator"])).status_code == 200


def test_a_tenant_admin_naming_another_tenants_tags_is_refused_403_and_invalidates_nothing(
    client,
):
    route = '{ route(contentId: "live-1") { best { nodeId } } }'
    globex = token("globex", roles=["user"])
    assert "errors" not in gql(client, route, tok=globex).json()  # kept in globex's cache
    admin = token("acme", roles=["admin"])
    refused = [
        ('mutation { invalidateCache(tenant: "globex") }', None),
        ("mutation($t: [String!]) { invalidateCache(tags: $t) }", {"t": ["tenant:globex"]}),
        ('mutation { a: invalidateCache(tenant: "acme") b: invalidateCache(tags: ["routing"]) }',
         None),
    ]  # fmt: skip
    for query, variables in refused:
        for accept in ("application/json", "application/graphql-response+json"):
            resp = gql(client, query, variables, tok=admin, headers={"Accept": accept})
            assert resp.status_code == 403 and "data" not in resp.json(), resp.text
            assert codes(resp) == ["FORBIDDEN"]
            message = resp.json()["errors"][0]["message"]
            assert message.startswith("invalidateCache: a tenant admin may invalidate only")
            assert "needs the 'operator' role" in message
        # The same on a socket: an error for the operation's id, nothing runs.
        with client.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
            init = {"Authorization": f"Bearer {admin}"}
            ws.send_json({"type": "connection_init", "payload": init})
            assert ws.receive_json()["type"] == "connection_ack"
            payload = {"query": query, "variables": variables}
            ws.send_json({"id": "1", "type": "subscribe", "payload": payload})
            msg = ws.receive_json()
            assert msg["type"] == "error" and msg["id"] == "1", msg
            assert msg["payload"][0]["extensions"]["code"] == "FORBIDDEN"
    # Nothing was invalidated: globex's answer is still the cached one.
    assert "errors" not in gql(client, route, tok=globex).json()
    assert client.fleet.calls["route_viewer"] == 1
    own = gql(client, 'mutation { invalidateCache(tenant: "acme") }', tok=admin)
    assert own.json() == {"data": {"invalidateCache": ["tenant:acme"]}}


def test_a_refusal_is_a_request_error_after_validation(client):
    tok = token(roles=["admin"])
    invalid = gql(client, "{ nodes { nope } }", tok=tok)  # invalid first: 200/400 as before
    assert codes(invalid) == ["GRAPHQL_VALIDATION_FAILED"]
    several = gql(client, "query A { nodes { id } } query B { me { name } }", tok=tok)
    assert codes(several) == ["OPERATION_NAME_REQUIRED"]
    resp = client.post(
        "/graphql",
        json={"query": "query A { nodes { id } } query B { me { name } }", "operationName": "B"},
        headers={"Authorization": f"Bearer {tok}"},
    )
    assert resp.status_code == 200 and resp.json() == {"data": {"me": {"name": "user-1"}}}


def test_the_resolvers_refuse_a_caller_without_the_role_in_depth():
    fleet = FakeFleet()
    gateway = BridgeApp(BridgeConfig(jwt_hs256_secret=SECRET), fleet=fleet).gateway
    admin = Principal("a", tenant="acme", roles=frozenset({"admin"}))
    with pytest.raises(AccessDenied) as refused:
        asyncio.run(gateway.set_node_mode(admin, "n1", "DRAINING", ""))
    assert refused.value.code == "FORBIDDEN" and fleet.calls == {}


def test_set_node_mode_invalidates_cached_answers(client):
    tok = admin = token(roles=["operator"])
    assert gql(client, NODE_Q, {"id": "n1"}, tok=tok).json()["data"]["node"]["mode"] == "NORMAL"
    m = (
        'mutation { setNodeMode(nodeId: "n1", mode: MAINTENANCE, reason: "disk") '
        "{ ok node { mode } } }"
    )
    assert gql(client, m, tok=admin).json()["data"]["setNodeMode"] == {
        "ok": True,
        "node": {"mode": "MAINTENANCE"},
    }
    assert (
        gql(client, NODE_Q, {"id": "n1"}, tok=tok).json()["data"]["node"]["mode"] == "MAINTENANCE"
    )


def test_backend_errors_have_stable_codes(client):
    admin = token(roles=["operator"])
    m = 'mutation { setNodeMode(nodeId: "ghost", mode: DRAINING) { ok } }'
    assert codes(gql(client, m, tok=admin)) == ["NOT_FOUND"]
    client.fleet.down = True
    assert codes(gql(client, "{ nodes { id } }", tok=admin)) == ["BACKEND_UNAVAILABLE"]


def _rsa_keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem.decode()


def _hs256_by_hand(claims: dict, secret: bytes) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


BAD_TOKENS = {
    "expired": token(exp_in=-60),
    "wrong audience": token(audience="other"),
    "wrong issuer": token(issuer="evil"),
    "forged signature": token(secret="not-the-secret-0123456789-0123456"),
    "garbled": "abc.def.ghi",
    "not a jwt": "hello",
    "missing tenant": token(tenant=None),
    "blank tenant": token(tenant="  "),
    "alg none": jwt.encode(
        {"tenant": "acme", "iss": "platform", "aud": "bridge", "exp": 9999999999},
        None,
        algorithm="none",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused_with_401(client, case):
    resp = gql(client, "{ me { tenant } }", tok=BAD_TOKENS[case])
    assert resp.status_code == 401
    assert codes(resp) == ["UNAUTHENTICATED"]
    assert resp.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "token abc", "B" * 10_000]
)
def test_malformed_authorization_headers_are_refused(client, header):
    resp = client.post(
        "/graphql", json={"query": "{ me { tenant } }"}, headers={"Authorization": header}
    )
    assert resp.status_code == 401 and codes(resp) == ["UNAUTHENTICATED"]


def test_rs256_tokens_are_verified_with_the_public_key():
    key, pem = _rsa_keys()
    c, _ = make_client(jwt_rs256_public_key=pem)
    with c:
        good = token(alg="RS256", key=key)
        assert gql(c, "{ me { tenant } }", tok=good).json()["data"]["me"]["tenant"] == "acme"
        # Algorithm confusion: an HS256 token "signed" with the public key must not pass.
        forged = _hs256_by_hand(
            {"tenant": "evil", "iss": "platform", "aud": "bridge", "exp": 9999999999},
            pem.encode(),
        )
        c2, _ = make_client(jwt_hs256_secret="", jwt_rs256_public_key=pem)
        with c2:
            assert gql(c2, "{ me { tenant } }", tok=forged).status_code == 401


@pytest.mark.parametrize(
    "body,expected_status,expected_code",
    [
        (b"{not json", 400, "BAD_REQUEST"),
        (b"[1, 2", 400, "BAD_REQUEST"),
        (b'"just a string"', 400, "BAD_REQUEST"),
        (b'{"query": 42}', 400, "BAD_REQUEST"),
        (b'{"query": "{ me { tenant } }", "variables": "x"}', 400, "BAD_REQUEST"),
        (b"\xff\xfe\x00garbage", 400, "BAD_REQUEST"),
    ],
)
def test_malformed_bodies_get_a_graphql_error_not_a_500(
    client, body, expected_status, expected_code
):
    resp = client.post("/graphql", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == expected_status
    assert codes(resp) == [expected_code]


@pytest.mark.parametrize(
    "query,variables,code",
    [
        ("{ me { tenant ", None, "GRAPHQL_PARSE_FAILED"),
        ("{ nope }", None, "GRAPHQL_VALIDATION_FAILED"),
        ("{ me { nope } }", None, "GRAPHQL_VALIDATION_FAILED"),
        (NODE_Q, {"id": {"a": 1}}, "BAD_USER_INPUT"),
        (NODE_Q, {}, "BAD_USER_INPUT"),
        ('{ route(contentId: "bad id with spaces") { considered } }', None, "BAD_USER_INPUT"),
        (
            '{ route(contentId: "x", latitude: 91, longitude: 0) { considered } }',
            None,
            "BAD_USER_INPUT",
        ),
        ("{ " + "a: me { tenant } " * 40 + "}", None, "QUERY_TOO_LARGE"),
        ("{ a " + "{ b " * 12 + "}" * 13, None, "QUERY_TOO_DEEP"),
    ],
)
def test_bad_queries_get_stable_error_codes(client, query, variables, code):
    resp = gql(client, query, variables, tok=token(roles=["operator"]))  # node: operators
    assert resp.status_code in (200, 400)
    assert code in codes(resp)


def test_oversized_query_and_body_are_refused_with_413(client):
    big = "{ me { tenant } }" + " " * 20_000
    assert gql(client, big).status_code == 413
    resp = client.post(
        "/graphql", content=b"x" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413 and codes(resp) == ["PAYLOAD_TOO_LARGE"]


def test_anonymous_callers_are_rate_limited_per_ip_with_429_and_retry_after():
    c, _ = make_client(anon_burst=3, anon_rate=0.01)
    with c:
        statuses = [gql(c, "{ me { anonymous } }").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        resp = gql(c, "{ me { anonymous } }")
        assert codes(resp) == ["RATE_LIMITED"]
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.headers["x-ratelimit-remaining"] == "0"


def test_tenants_have_their_own_buckets_and_overrides():
    c, _ = make_client(tenant_burst=2, tenant_rate=0.01, tenant_limits="big=5/0.01")
    with c:
        small = [gql(c, "{ me { tenant } }", tok=token("small")).status_code for _ in range(3)]
        big = [gql(c, "{ me { tenant } }", tok=token("big")).status_code for _ in range(6)]
        assert small == [200, 200, 429]
        assert big == [200] * 5 + [429]


def test_health_and_metrics(client):
    setup_metrics("bridge-test")
    ops = {"Authorization": f"Bearer {token(roles=['operator'])}"}  # operators only
    health = client.get("/health", headers=ops).json()
    assert health["status"] == "ok" and health["redis"] == "embedded"
    gql(client, NODE_Q, {"id": "n1"}, tok=token(roles=["operator"]))
    text = client.get("/metrics", headers=ops).text
    assert "bridge_cache_requests" in text


def test_graphiql_page_is_served_with_local_assets(client):
    page = client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "GraphiQL" in page.text
    assert "unpkg" not in page.text and "cdn" not in page.text.lower()
    assert client.get("/static/graphiql/graphiql.min.js").status_code == 200


def test_unknown_paths_and_methods_get_json_errors(client):
    assert client.get("/nope").status_code == 404
    assert client.put("/graphql").status_code == 405


def test_subscription_without_signalman_answers_a_clear_error(client):
    with client.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token()}"}})
        assert ws.receive_json()["type"] == "connection_ack"
        ws.send_json(
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": 'subscription { tenantEvents(channels: ["nodes"]) { id } }'},
            }
        )
        msg = ws.receive_json()
        errs = msg["payload"] if msg["type"] == "error" else msg["payload"]["errors"]
        assert errs[0]["extensions"]["code"] == "SUBSCRIPTIONS_UNAVAILABLE"


def test_subscription_relays_the_callers_tenant_events():
    events = FakeEvents(
        [
            {
                "channel": "nodes", "offset": "1", "epoch": "e", "id": "ev1", "type": "node.up",
                "time": 1.0, "source": "foghorn", "data": "{}",
            }
        ]
    )  # fmt: skip
    c, _ = make_client(events=events)
    with c, c.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json(
            {"type": "connection_init", "payload": {"Authorization": f"Bearer {token('acme')}"}}
        )
        assert ws.receive_json()["type"] == "connection_ack"
        q = 'subscription { tenantEvents(channels: ["nodes"]) { id tenant type } }'
        ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": q}})
        msg = ws.receive_json()
        assert msg["type"] == "next"
        assert msg["payload"]["data"]["tenantEvents"] == {
            "id": "ev1",
            "tenant": "acme",
            "type": "node.up",
        }
    # One upstream stream per tenant, on every channel; Bridge filters per subscription.
    assert events.subscribed == [("acme", ["all"])]


def test_subscription_with_a_bad_token_is_rejected(client):
    with client.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init", "payload": {"Authorization": "Bearer junk"}})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4403
        assert closed.value.reason.startswith("invalid token: ")


def test_a_verified_token_still_expires():
    from api_gateway.auth import AuthError, JwtAuthenticator, JwtSettings
    from pkg.common.clock import FakeClock

    clock = FakeClock(wall_start=__import__("time").time())
    auth = JwtAuthenticator(JwtSettings(hs256_secret=SECRET, leeway_s=0), clock)
    tok = token(exp_in=60)
    assert auth.authenticate(f"Bearer {tok}").tenant == "acme"
    assert auth.authenticate(f"Bearer {tok}").tenant == "acme"  # from the verified cache
    clock.advance(61)
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(f"Bearer {tok}")


def test_a_devtoken_is_accepted_by_a_replica_with_the_same_secret(client):
    from api_gateway.devtoken import mint

    tok = mint(SECRET, "demo", ["admin"], "platform", "bridge", 60)
    me = gql(client, "{ me { tenant roles } }", tok=tok).json()["data"]["me"]
    assert me == {"tenant": "demo", "roles": ["admin"]}


@pytest.mark.parametrize("proxies", ["192.0.2.0/24", ""])
def test_anonymous_buckets_follow_x_forwarded_for_only_behind_a_trusted_proxy(proxies):
    config = BridgeConfig(
        jwt_hs256_secret=SECRET, anon_burst=1, anon_rate=0.01, trusted_proxies=proxies
    )
    app = BridgeApp(config, fleet=FakeFleet())
    with TestClient(app.asgi, client=("192.0.2.10", 40000)) as c:

        def status(forwarded: str) -> int:
            reply = gql(c, "{ me { anonymous } }", headers={"X-Forwarded-For": forwarded})
            return int(reply.status_code)

        assert status("10.0.0.1") == 200
        if proxies:  # the balancer's peer is trusted: each client behind it has its own bucket
            assert status("10.0.0.2") == 200
            assert status("10.0.0.1") == 429
            # A client writing the header itself only adds hops to the left of the one the
            # balancer appended (its real address): it cannot pick its bucket.
            assert status("10.0.0.99, 10.0.0.1") == 429
        else:  # nobody trusted: the header is ignored, every request is the peer's
            assert status("10.0.0.2") == 429


def test_health_figures_count_requests_and_cache_answers(client):
    ops = {"Authorization": f"Bearer {token(roles=['operator'])}"}  # the full report
    before = client.get("/health", headers=ops).json()["figures"]
    for _ in range(3):
        assert gql(client, NODE_Q, {"id": "n1"}, tok=token(roles=["operator"])).status_code == 200
    after = client.get("/health", headers=ops).json()["figures"]
    assert after["requests"] - before["requests"] == 3
    assert after["http_5xx"] == before["http_5xx"]
    assert after["cache_hit_rate"] > 0  # the second and third lookups came from the cache
    assert after["breakers_open"].startswith("0/")


def _apq(query: str | None, digest: str) -> dict:
    body: dict = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": digest}}}
    if query is not None:
        body["query"] = query
    return body


def test_persisted_queries_follow_the_apq_protocol(client):
    query = '{ route(contentId: "live/apq") { best { nodeId } } }'
    digest = hashlib.sha256(query.encode()).hexdigest()
    # Hash alone, never seen: the error Apollo's clients answer by sending the query.
    miss = client.post("/graphql", json=_apq(None, digest))
    assert miss.status_code == 200
    assert miss.json()["errors"][0]["message"] == "PersistedQueryNotFound"
    assert codes(miss) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert "no-cache" in miss.headers["cache-control"]
    # Query and hash: registered and run; then the hash alone runs it, by POST and by GET.
    first = client.post("/graphql", json=_apq(query, digest))
    assert first.json()["data"]["route"]["best"]["nodeId"] == "n1"
    again = client.post("/graphql", json=_apq(None, digest))
    assert again.json() == first.json()
    extensions = json.dumps(_apq(None, digest)["extensions"])
    got = client.get(
        "/graphql", params={"extensions": extensions}, headers={"Accept": "application/json"}
    )
    assert got.status_code == 200 and got.json() == first.json()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_apq("{ me { tenant } }", "0" * 64), "does not match"),
        (_apq(None, "not-a-hash"), "64 hexadecimal"),
        ({"extensions": {"persistedQuery": {"version": 2, "sha256Hash": "0" * 64}}}, "version"),
        ({"extensions": {"persistedQuery": "x"}}, "must be an object"),
    ],
)
def test_bad_persisted_query_requests_are_400_and_register_nothing(client, body, says):
    reply = client.post("/graphql", json=body)
    assert reply.status_code == 400
    assert codes(reply) == ["BAD_REQUEST"] and says in reply.json()["errors"][0]["message"]
    miss = client.post("/graphql", json=_apq(None, "0" * 64))
    assert codes(miss) == ["PERSISTED_QUERY_NOT_FOUND"]


def test_persisted_queries_follow_the_apq_protocol_over_websocket(client):
    query = '{ route(contentId: "live/apq-ws") { best { nodeId } } }'
    digest = hashlib.sha256(query.encode()).hexdigest()
    with client.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init", "payload": {"Authorization": f"Bearer {token()}"}})
        assert ws.receive_json()["type"] == "connection_ack"

        def subscribe(op_id: str, body: dict) -> dict:
            ws.send_json({"id": op_id, "type": "subscribe", "payload": body})
            return ws.receive_json()

        # Hash alone, never seen: an error for that operation, the socket stays open.
        miss = subscribe("1", _apq(None, digest))
        assert miss["type"] == "error" and miss["id"] == "1"
        assert miss["payload"][0]["message"] == "PersistedQueryNotFound"
        assert miss["payload"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
        # A hash that is not the query's, or a malformed one: BAD_REQUEST, nothing registered.
        for op_id, body, says in [
            ("2", _apq(query, "0" * 64), "does not match"),
            ("3", _apq(None, "not-a-hash"), "64 hexadecimal"),
        ]:
            refused = subscribe(op_id, body)
            assert refused["type"] == "error" and refused["id"] == op_id
            assert refused["payload"][0]["extensions"]["code"] == "BAD_REQUEST"
            assert says in refused["payload"][0]["message"]
        # Query and hash: registered and run; then the hash alone runs it.
        first = subscribe("4", _apq(query, digest))
        assert first["type"] == "next"
        assert first["payload"]["data"]["route"]["best"]["nodeId"] == "n1"
        assert ws.receive_json() == {"id": "4", "type": "complete"}
        again = subscribe("5", _apq(None, digest))
        assert again["type"] == "next" and again["payload"] == first["payload"]
    # The same registry as HTTP: the hash registered over the socket runs over POST too.
    assert client.post("/graphql", json=_apq(None, digest)).json() == first["payload"]


def test_oversized_headers_are_refused_before_graphql_runs(client):
    # /graphql is dispatched ahead of Starlette's router (GraphQLRoute): the limit still holds.
    padding = {"X-Padding": "p" * 17_000}
    for reply in (
        client.post("/graphql", json={"query": "{ me { tenant } }"}, headers=padding),
        client.get("/graphql", params={"query": "{ me { tenant } }"}, headers=padding),
    ):
        assert reply.status_code == 431
        assert codes(reply) == ["BAD_REQUEST"]


def test_an_unexpected_failure_in_the_view_is_a_json_500(client, monkeypatch):
    # /graphql runs ahead of Starlette's error middleware (GraphQLRoute): the view answers it.
    def broken(_header):
        raise RuntimeError("bug")

    monkeypatch.setattr(client.app.view.guard.auth, "authenticate", broken)
    reply = client.post("/graphql", json={"query": "{ me { tenant } }"})
    assert reply.status_code == 500
    assert codes(reply) == ["INTERNAL_SERVER_ERROR"]
    assert "bug" not in reply.text
