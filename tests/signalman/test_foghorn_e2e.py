"""End to end: edge nodes -> Foghorn -> Kafka -> Signalman -> a SYSTEM subscriber.

Foghorn and the simulated fleet run as processes; Signalman runs in-process on real Kafka and
Redis. Foghorn publishes node events under the SYSTEM tenant through ``pkg.events.build_sink``.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from api_realtime.config import SignalmanConfig
from api_realtime.server import SignalmanApp
from pkg.clients.signalman import SignalmanClient
from pkg.common.auth import parse_tokens
from pkg.devstack.servers import CommandProcess
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import TOKENS

pytestmark = pytest.mark.integration

FOGHORN_TOKENS = TOKENS + ",tnode=edge:node;nodes=*;tenants=*"


async def test_foghorn_node_events_reach_system_subscribers(
    kafka_broker: Any, redis_server: Any, process_factory: Callable[..., CommandProcess]
) -> None:
    topic = "signalman.events"  # Foghorn's default topic (pkg.events.kafka.DEFAULT_TOPIC)
    suffix = uuid.uuid4().hex[:8]
    cfg = SignalmanConfig(
        grpc_port=0, kafka_bootstrap=kafka_broker.bootstrap, topic=topic,
        group_id=f"signalman-e2e-{suffix}", redis_url=redis_server.url,
        redis_prefix=f"sm-e2e-{suffix}", session_timeout_ms=6_000, heartbeat_interval_ms=500,
        http_port=-1,
    )  # fmt: skip
    app = SignalmanApp(cfg, tokens=parse_tokens(TOKENS))
    await app.start()
    client = SignalmanClient(f"127.0.0.1:{app.port}", token="tsys")
    try:
        async with client.subscribe(["system"], resume_from={"system": ("", 0)}) as sub:
            foghorn = process_factory(
                "foghorn",
                [sys.executable, "-m", "api_balancing", "--grpc-port", "{port}",
                 "--http-port", "-1"],
                env={"PLATFORM_TOKENS": FOGHORN_TOKENS, "FOGHORN_REPLICA_ID": f"foghorn-{suffix}",
                     "FOGHORN_KAFKA_BOOTSTRAP": kafka_broker.bootstrap},
            )  # fmt: skip
            process_factory(
                "edge-sim",
                [sys.executable, "-m", "api_balancing.simulator", "--foghorn",
                 f"127.0.0.1:{foghorn.port}", "--nodes", "3", "--interval", "1",
                 "--token", "tnode", "--base-port", "{port}"],
                ready_port=foghorn.port,
            )  # fmt: skip
            registered: set[str] = set()
            while len(registered) < 3:
                item = await sub.get(40)
                assert isinstance(item, pb.Event)
                assert item.tenant == "system" and item.channel == "system"
                data = json.loads(item.data_json)
                # Other tests may share the broker's default topic: count only this Foghorn's.
                if item.type == "node.registered" and data.get("replica") == f"foghorn-{suffix}":
                    registered.add(data["node_id"])
    finally:
        await client.close()
        await app.stop()
