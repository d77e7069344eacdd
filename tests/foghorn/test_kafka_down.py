"""Kafka down: Foghorn keeps routing and accepting nodes, and its /health says what is wrong.

A real broker (tansu) is paused with SIGSTOP while Foghorn emits an event for every routing
decision and registration: connections hang, which is worse than refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.foghorn.conftest import Harness, eventually, report_msg

pytestmark = [pytest.mark.integration, pytest.mark.failure]


async def route_all(h: Harness, n: int, offset: int = 0) -> None:
    for i in range(offset, offset + n):
        reply = await h.anon.route_viewer(f"s{i}", lat=50.0, lon=8.0)
        assert reply.best.node_id in {"n1", "n2"}


async def test_kafka_down_routing_never_fails_and_health_says_so(
    kafka_factory: Callable[..., Any], make_foghorn: Callable[..., Awaitable[Harness]]
) -> None:
    broker = kafka_factory()
    h = await make_foghorn(kafka_bootstrap=broker.bootstrap, routing_event_sample=1.0)
    sink = h.server.events
    await eventually(lambda: sink.connected, timeout=30, what="event sink connected")
    await h.node("n1", report_msg())
    await route_all(h, 10)
    await eventually(lambda: sink.sent >= 10, timeout=30, what="events sent while Kafka is up")
    broker.pause()
    try:
        await route_all(h, 200, offset=10)  # every decision is an event the broker never takes
        await h.node("n2", report_msg())  # registering while Kafka hangs is not held up either
        await eventually(lambda: not sink.connected, timeout=30, what="sink sees the outage")
        await route_all(h, 200, offset=210)
        health = h.server.health().to_json()
        assert health["status"] == "ok"  # routing does not depend on Kafka
        events = health["dependencies"]["events"]
        assert events["status"] == "degraded" and events["connected"] is False
        assert "Kafka unreachable" in events["reason"]
        assert events["buffered"] > 0 and events["dropped"] == 0  # bounded buffer, not full yet
        assert h.server.fleet.counters.routing_failures == 0
    finally:
        broker.resume()
    await eventually(lambda: sink.connected and sink.buffered == 0, timeout=60,
                     what="buffered events delivered once Kafka is back")  # fmt: skip
    assert h.server.health().to_json()["dependencies"]["events"]["status"] == "ok"
    assert sink.dropped == 0


async def test_stop_closes_the_event_sink_and_counts_what_it_could_not_send(
    make_foghorn: Callable[..., Awaitable[Harness]],
) -> None:
    """Kafka never reachable: on stop the sink is flushed for a bounded time and closed; the
    events it could not send are counted as dropped (and logged), none is left buffered."""
    from structlog.testing import capture_logs

    from pkg.devstack.servers import free_port

    h = await make_foghorn(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens
    await h.node("n1", report_msg())  # node.registered: an event that cannot leave
    sink = h.server.events
    assert sink.buffered >= 1
    with capture_logs() as logs:
        await h.close()
    assert sink.buffered == 0 and sink.dropped >= 1
    assert any(e["event"] == "kafka_sink_dropped_at_close" for e in logs)
