"""The three services share one skeleton: the same app verbs, one health report served on
/health (and by gRPC health where there is a gRPC server), not serving from the first moment of
a stop. Each app runs in process, embedded (no backing servers), on free ports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from api_balancing.config import FoghornConfig
from api_balancing.server import FoghornApp
from api_gateway.config import BridgeConfig
from api_gateway.server import BridgeApp
from api_realtime.config import SignalmanConfig
from api_realtime.server import SignalmanApp
from pkg.clients.http import AsyncHttpClient
from pkg.common.auth import parse_tokens
from pkg.common.config import default_replica_id
from pkg.devstack.servers import free_port
from pkg.events import MemorySink


def _foghorn() -> FoghornApp:
    config = FoghornConfig(grpc_port=0, http_port=0, tokens="t=ops:operator", replica_id="f-1")
    return FoghornApp(config, events=MemorySink())


def _bridge() -> BridgeApp:
    return BridgeApp(BridgeConfig(http_port=free_port(), replica_id="b-1", tokens="t=ops:operator"))


def _signalman() -> SignalmanApp:
    config = SignalmanConfig(grpc_port=0, http_port=0, replica_id="s-1")
    return SignalmanApp(config, tokens=parse_tokens("t=ops:operator"))


SERVICES: dict[str, Callable[[], Any]] = {
    "foghorn": _foghorn,
    "bridge": _bridge,
    "signalman": _signalman,
}
# Keys each service's status view and drills read at the top level of its /health.
TOP_LEVEL_KEYS = {
    "foghorn": {"counts", "routing"},
    "bridge": {"redis", "foghorn", "signalman", "auth"},
    "signalman": {"partitions", "subscribers", "singleton", "mode", "replica_id"},
}


async def _grpc_health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_every_service_serves_one_health_report_and_stops_serving_first(
    name: str,
) -> None:
    app = SERVICES[name]()
    await app.start()
    try:
        async with AsyncHttpClient() as http:
            # An operator's credential: the full report is for operators.
            reply = await http.get(
                f"http://127.0.0.1:{app.http_port}/health", headers={"Authorization": "Bearer t"}
            )
            doc = reply.json()
            assert reply.status_code == 200
            assert doc["status"] == "ok" and doc["service"] == name
            assert doc["replica"] == app.config.replica_id
            assert {"reasons", "dependencies", "figures"} <= set(doc)
            assert TOP_LEVEL_KEYS[name] <= set(doc)
            assert doc == app.health().to_json()
        if isinstance(app, FoghornApp | SignalmanApp):  # Bridge has no gRPC server
            assert await _grpc_health(app.grpc_target) == health_pb2.HealthCheckResponse.SERVING
        app.lifecycle.stopping = True  # what stop() does first
        report = app.health()
        assert report.status.value == "not_serving" and report.http_status == 503
    finally:
        await app.stop()


def test_every_service_defaults_its_replica_id_the_same_way() -> None:
    configs = [FoghornConfig(), BridgeConfig(), SignalmanConfig()]
    assert {c.replica_id for c in configs} == {default_replica_id()}
