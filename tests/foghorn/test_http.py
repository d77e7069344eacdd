"""The HTTP side of the same process: /health, /metrics, /play redirects, /nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pkg.clients import Policy, RetryPolicy
from pkg.clients.http import AsyncHttpClient
from pkg.common.telemetry import setup_metrics
from tests.foghorn.conftest import TOKEN, Harness, report_msg


@pytest.fixture
async def web(make_foghorn) -> AsyncIterator[tuple[Harness, AsyncHttpClient]]:  # type: ignore[no-untyped-def]
    setup_metrics("foghorn-test")
    h: Harness = await make_foghorn(http_port=0)
    # One attempt: these tests look at each answer as it is (503 + Retry-After included).
    policy = Policy(timeout=10.0, retry=RetryPolicy(max_attempts=1))
    # The operator's view: /nodes, /metrics and the full /health need the operator role.
    client = AsyncHttpClient(f"http://127.0.0.1:{h.server.http_port}", policy, token=TOKEN)
    try:
        yield h, client
    finally:
        await client.aclose()


async def test_health_reports_status_dependencies_and_counts(web) -> None:  # type: ignore[no-untyped-def]
    h, http = web
    await h.node("n1", report_msg())
    await h.node("quiet")  # connected, never reported: stale
    reply = await http.get("/health")
    assert reply.status_code == 200
    doc = reply.json()
    assert doc["status"] == "ok"
    assert doc["dependencies"]["store"] == {"kind": "memory", "status": "ok"}
    assert doc["counts"]["nodes"] == 2 and doc["counts"]["connected"] == 2
    assert doc["counts"]["stale"] == 1
    assert doc["counts"]["reports_accepted"] == 1


async def test_metrics_are_prometheus_text(web) -> None:  # type: ignore[no-untyped-def]
    h, http = web
    await h.node("n1", report_msg())
    await h.anon.route_viewer("s1")
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert "foghorn_reports" in reply.text
    assert "foghorn_routing_decisions" in reply.text


async def test_play_redirects_to_the_best_nodes_url(web) -> None:  # type: ignore[no-untyped-def]
    h, http = web
    await h.node("paris", report_msg(), lat=48.86, lon=2.35)
    await h.node("tokyo", report_msg(), lat=35.68, lon=139.69)
    reply = await http.get("/play/live/show-1?lat=35.6&lon=139.7")
    assert reply.status_code == 302
    assert reply.headers["location"] == "http://tokyo.example:8080/hls/live/show-1/index.m3u8"
    assert reply.headers["x-foghorn-node"] == "tokyo"
    webrtc = await http.get("/play/show-1?lat=48.8&lon=2.3&protocol=webrtc")
    assert webrtc.headers["location"] == "http://paris.example:8080/webrtc/show-1"


async def test_play_with_bad_input_is_400_naming_the_field(web) -> None:  # type: ignore[no-untyped-def]
    h, http = web
    await h.node("n1", report_msg())
    for path, field in [
        ("/play/s1?lat=abc&lon=1", "lat"),
        ("/play/s1?lat=95&lon=1", "location.latitude"),
        ("/play/s1?lat=1", "lon"),
        ("/play/s1?protocol=ftp", "protocol"),
        ("/play/bad%20id", "content_id"),
    ]:
        reply = await http.get(path)
        assert reply.status_code == 400, path
        assert reply.json()["field"] == field


async def test_play_without_eligible_nodes_is_503(web) -> None:  # type: ignore[no-untyped-def]
    _, http = web
    reply = await http.get("/play/s1")
    assert reply.status_code == 503
    assert "no eligible" in reply.json()["error"]


async def test_nodes_overview_lists_every_node(web) -> None:  # type: ignore[no-untyped-def]
    h, http = web
    await h.node("a", report_msg(cpu=33, streams=(("s1", "acme", 4),)))
    await h.node("b")
    doc = (await http.get("/nodes")).json()
    assert doc["count"] == 2
    a, b = doc["nodes"]
    assert a["node_id"] == "a" and a["cpu_percent"] == 33 and a["viewers"] == 4
    assert b["stale"] is True and b["cpu_percent"] is None
