"""Fixtures for Signalman: an in-process embedded replica, clients, and event helpers."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from api_realtime.config import SignalmanConfig
from api_realtime.server import SignalmanApp
from pkg.clients.signalman import SignalmanClient
from pkg.common.auth import parse_tokens
from tests.waiting import eventually

TOKENS = ",".join(
    [
        "ta=alice@acme:tenant-user",
        "ta2=alice2@acme:tenant-user",
        "tb=bob@globex:tenant-user",
        # Publishing (embedded mode) is the platform's: system credentials, any tenant.
        "tpa=pub-a:system",
        "tpb=pub-b:system",
        "tsys=ops:system",
        "tops=operator:operator",  # full /health, /metrics
        "tnotenant=svc",  # authenticates, has no role: may do nothing
    ]
)
TOKEN_ENV = {"PLATFORM_TOKENS": TOKENS}


def event(tenant: str, etype: str = "stream.started", **data: Any) -> dict[str, Any]:
    """An event envelope object (without the envelope version)."""
    return {
        "id": uuid.uuid4().hex,
        "type": etype,
        "tenant": tenant,
        "time": time.time(),
        "schema_version": 1,
        "source": "test",
        "data": data,
    }


def event_json(tenant: str, etype: str = "stream.started", **data: Any) -> str:
    return json.dumps(event(tenant, etype, **data))


# Signalman tests poll a little less often (replica processes on a loaded machine).
wait_until = functools.partial(eventually, interval=0.05)


def plain_consumer(bootstrap: str, group: str, session_timeout_ms: int) -> AIOKafkaConsumer:
    """A plain aiokafka group member (no Signalman around it), for tests of group mechanics on
    the real broker: manual commits, heartbeats every 500 ms."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=session_timeout_ms,
        rebalance_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=500,
    )


def embedded_config(**overrides: Any) -> SignalmanConfig:
    base: dict[str, Any] = {
        "grpc_port": 0,
        "http_port": -1,
        "subscriber_buffer": 50,
        "max_connections_per_tenant": 3,
        "history_maxlen": 1_000,
        "duties_interval_s": 3600.0,
    }
    base.update(overrides)
    return SignalmanConfig(**base)


@pytest.fixture
async def app() -> AsyncIterator[SignalmanApp]:
    """An embedded Signalman (memory history, events via Publish) on a free port."""
    replica = SignalmanApp(embedded_config(), tokens=parse_tokens(TOKENS))
    await replica.start()
    try:
        yield replica
    finally:
        await replica.stop()


@pytest.fixture
async def connect(app: SignalmanApp) -> AsyncIterator[Callable[[str], SignalmanClient]]:
    """Make clients of ``app`` with a given token; all are closed after the test."""
    made: list[SignalmanClient] = []

    def make(token: str) -> SignalmanClient:
        client = SignalmanClient(f"127.0.0.1:{app.port}", token=token)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.close()
