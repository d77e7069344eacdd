"""Operator surfaces over raw httpx, on Foghorn, Signalman and Bridge: the public /health says
only ok/degraded; the full health document, /nodes and /metrics need an operator credential
(401 without a token, 403 naming the role with another credential); gRPC reflection is
operator-only (tests/security/test_access_maps.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.bridge.fakes import token as jwt_token
from tests.interfaces.conftest import OPERATOR_TOKEN, Platform
from tests.security import conftest as sec
from tests.security.conftest import Foghorn, Signalman

pytestmark = pytest.mark.integration


async def test_foghorns_public_health_says_only_ok_or_degraded(foghorn: Foghorn) -> None:
    async with httpx.AsyncClient(base_url=foghorn.http) as http:
        for token in (None, sec.NODE_PARIS, sec.ACME_ADMIN):
            reply = await http.get("/health", headers=dict(sec.auth(token)))
            assert reply.status_code == 200 and reply.json() == {"status": "ok"}, token
        # An invalid token is refused even where none is needed (as on public gRPC methods).
        assert (await http.get("/health", headers=dict(sec.auth("not-a-token")))).status_code == 401
        full = (await http.get("/health", headers=dict(sec.auth(sec.OPS)))).json()
    assert full["status"] == "ok" and "dependencies" in full and "figures" in full


@pytest.mark.parametrize("path", ["/nodes", "/metrics"])
async def test_foghorns_operator_routes_refuse_everyone_else(foghorn: Foghorn, path: str) -> None:
    async with httpx.AsyncClient(base_url=foghorn.http) as http:
        anonymous = await http.get(path)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        bad = await http.get(path, headers=dict(sec.auth("not-a-token")))
        assert bad.status_code == 401
        for token in (sec.NODE_PARIS, sec.ACME_ADMIN, sec.RELAY, sec.NOROLE):
            reply = await http.get(path, headers=dict(sec.auth(token)))
            assert reply.status_code == 403, token
            assert "requires role operator" in reply.json()["error"]
        assert (await http.get(path, headers=dict(sec.auth(sec.OPS)))).status_code == 200


async def test_signalmans_health_and_metrics_follow_the_same_rules(signalman: Signalman) -> None:
    async with httpx.AsyncClient(base_url=signalman.http) as http:
        public = await http.get("/health", headers=dict(sec.auth(sec.ACME_USER)))
        assert public.json() == {"status": "ok"}
        full = (await http.get("/health", headers=dict(sec.auth(sec.OPS)))).json()
        assert "subscribers" in full or "figures" in full
        assert (await http.get("/metrics")).status_code == 401
        assert (
            await http.get("/metrics", headers=dict(sec.auth(sec.ACME_ADMIN)))
        ).status_code == 403
        assert (await http.get("/metrics", headers=dict(sec.auth(sec.OPS)))).status_code == 200


async def test_bridges_health_and_metrics_follow_the_same_rules(platform: Platform) -> None:
    """Bridge's operator is a platform token with the operator role (what Prometheus sends) or
    a JWT with the operator role; a tenant's JWT, even its admin's, is not one."""
    user, admin = jwt_token("acme"), jwt_token("acme", ["admin"])
    operator_jwt = jwt_token("acme", ["operator"])
    tenant_platform = "sig-acme"  # a platform token with the tenant-user role
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.bridge_port}") as http:
        for token in (None, user, admin, tenant_platform):
            public = await http.get("/health", headers=dict(sec.auth(token)))
            assert public.status_code == 200 and set(public.json()) == {"status"}, token
            assert public.json()["status"] in ("ok", "degraded")
        assert (await http.get("/health", headers=dict(sec.auth("not-a-token")))).status_code == 401
        for token in (OPERATOR_TOKEN, operator_jwt):
            full = (await http.get("/health", headers=dict(sec.auth(token)))).json()
            assert {"dependencies", "figures", "replica"} <= set(full), token
        anonymous = await http.get("/metrics")
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers=dict(sec.auth("x.y.z")))).status_code == 401
        for token in (user, admin, tenant_platform):
            reply = await http.get("/metrics", headers=dict(sec.auth(token)))
            assert reply.status_code == 403, token
            assert "requires role operator" in reply.json()["error"]
        for token in (OPERATOR_TOKEN, operator_jwt):
            reply = await http.get("/metrics", headers=dict(sec.auth(token)))
            assert reply.status_code == 200 and "bridge_http_responses" in reply.text, token
