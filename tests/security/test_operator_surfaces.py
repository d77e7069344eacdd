"""Operator surfaces over raw httpx: the public /health says only ok/degraded; the full health
document, /nodes and /metrics need an operator credential (401 without a token, 403 naming the
role with another credential); gRPC reflection is operator-only (tests/security/
test_access_maps.py)."""

from __future__ import annotations

import httpx
import pytest

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
