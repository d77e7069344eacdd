"""One replica on real servers: tansu (Kafka), redis-server (history), PostgreSQL (locks)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from api_realtime.config import SignalmanConfig
from api_realtime.server import SignalmanApp
from pkg.clients.signalman import Gap, SignalmanClient
from pkg.common.auth import parse_tokens
from pkg.events import Event
from pkg.events.envelope import encode_event
from pkg.events.kafka import KafkaSink
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import TOKENS, wait_until
from tests.signalman.test_kafka_sink import consume_all

pytestmark = pytest.mark.integration


def kafka_config(kafka: Any, redis: Any, postgres: Any, **overrides: Any) -> SignalmanConfig:
    suffix = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "grpc_port": 0,
        "http_port": -1,
        "kafka_bootstrap": kafka.bootstrap,
        "topic": f"events-{suffix}",
        "group_id": f"signalman-{suffix}",
        "partitions": 4,
        "redis_url": redis.url,
        "redis_prefix": f"sm-{suffix}",
        "postgres_dsn": postgres.dsn,
        "session_timeout_ms": 6_000,
        "heartbeat_interval_ms": 500,
        "duties_interval_s": 0.5,
        "redrive_delay_s": 0.0,
        "replica_id": f"r-{suffix}",
    }
    base.update(overrides)
    return SignalmanConfig(**base)


@pytest.fixture
async def replica(
    kafka_broker: Any, redis_server: Any, postgres_server: Any
) -> AsyncIterator[SignalmanApp]:
    app = SignalmanApp(
        kafka_config(kafka_broker, redis_server, postgres_server),
        tokens=parse_tokens(TOKENS),
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def reader(replica: SignalmanApp) -> AsyncIterator[SignalmanClient]:
    client = SignalmanClient(f"127.0.0.1:{replica.port}", token="ta")
    try:
        yield client
    finally:
        await client.close()


async def produce_raw(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def test_events_arrive_in_order_per_tenant(
    replica: SignalmanApp, reader: SignalmanClient
) -> None:
    sink = KafkaSink(replica.config.kafka_bootstrap, topic=replica.config.topic, source="test")
    try:
        for i in range(200):
            sink.emit(Event("stream.started", "acme", {"seq": i}))
            sink.emit(Event("stream.started", "globex", {"seq": i}))
        # Resume from the very start of the history: nothing consumed before we subscribed is lost.
        async with reader.subscribe(["streams"], resume_from={"streams": ("", 0)}) as sub:
            seqs = []
            for _ in range(200):
                item = await sub.get(20)
                assert isinstance(item, pb.Event) and item.tenant == "acme"
                seqs.append(json.loads(item.data_json)["seq"])
            assert seqs == list(range(200))
    finally:
        sink.close()
    await wait_until(lambda: replica.processor.stats.appended == 400)
    stats = await reader.stats()
    assert stats.mode == "kafka" and len(stats.partitions) == 4
    assert stats.events_appended == 400 and stats.duplicate_appends_skipped == 0


async def test_poison_events_are_dead_lettered_and_partition_continues(
    replica: SignalmanApp, reader: SignalmanClient
) -> None:
    cfg = replica.config
    good = Event("stream.ended", "acme", {"after": "poison"})
    no_tenant = json.dumps({"v": 1, "type": "stream.started", "id": "x1"}).encode()
    wrong_schema = json.dumps({"v": 1, "type": "stream.started", "tenant": "acme", "id": "x2",
                               "schema_version": 7}).encode()  # fmt: skip
    await produce_raw(cfg.kafka_bootstrap, cfg.topic, [
        (b"acme", b"\x00\x01garbage"),
        (b"acme", no_tenant),
        (b"acme", wrong_schema),
        (b"acme", encode_event(good)),
    ])  # fmt: skip
    async with reader.subscribe(["streams"], resume_from={"streams": ("", 0)}) as sub:
        item = await sub.get(20)
        assert isinstance(item, pb.Event) and item.id == good.id
    await wait_until(lambda: replica.processor.stats.dead_lettered == 3, timeout=20)
    dead = await consume_all(cfg.kafka_bootstrap, cfg.dlq_topic, 3)
    reasons = {dict(r.headers)["reason"].decode(): dict(r.headers) for r in dead}
    assert any("not JSON" in r for r in reasons)
    assert any("tenant: missing" in r for r in reasons)
    retryable = [h for r, h in reasons.items() if "schema_version" in r]
    assert retryable and retryable[0]["retryable"] == b"1"
    for headers in reasons.values():
        assert headers["source"].decode().startswith(f"{cfg.topic}/")
    assert {r.value for r in dead} >= {b"\x00\x01garbage", no_tenant}


async def test_retryable_dead_letters_are_redriven_a_bounded_number_of_times(
    replica: SignalmanApp,
) -> None:
    cfg = replica.config
    newer = json.dumps({"v": 1, "type": "stream.started", "tenant": "acme", "id": "n1",
                        "schema_version": 2}).encode()  # fmt: skip
    await produce_raw(cfg.kafka_bootstrap, cfg.topic, [(b"acme", newer)])
    # The singleton re-drives it (delay 0 in this test) until the attempts run out, then parks it.
    await wait_until(lambda: replica.redriver.parked >= 1, timeout=40)
    assert replica.redriver.redriven == cfg.redrive_max_attempts
    assert replica.processor.stats.dead_lettered == cfg.redrive_max_attempts + 1
    assert replica.duties.leader


async def test_health_and_metrics_endpoints(
    kafka_broker: Any, redis_server: Any, postgres_server: Any
) -> None:
    from pkg.clients.http import AsyncHttpClient
    from pkg.common.telemetry import setup_metrics
    from pkg.devstack.servers import free_port

    setup_metrics("signalman-test")
    cfg = kafka_config(kafka_broker, redis_server, postgres_server, http_port=free_port())
    app = SignalmanApp(cfg, tokens=parse_tokens(TOKENS))
    await app.start()
    try:
        http_client = AsyncHttpClient(base_url=f"http://127.0.0.1:{cfg.http_port}", token="tops")
        async with http_client as http:
            await wait_until(lambda: app.member is not None and len(app.member.owned) == 4)
            health = await http.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert body["status"] == "ok" and body["redis"] == "ok"
            assert body["postgres_lock_connection"] == "ok" and len(body["partitions"]) == 4
            assert body["figures"]["partitions"] == 4  # the status view's line
            assert body["figures"]["consumer_lag"] >= 0 and body["figures"]["subscribers"] == 0
            assert body["figures"]["dead_members_removed"] == 0  # alone in its group
            await produce_raw(cfg.kafka_bootstrap, cfg.topic, [(b"acme", b"junk")])
            await wait_until(lambda: app.processor.stats.dead_lettered == 1, timeout=20)
            metrics = (await http.get("/metrics")).text
            assert "signalman_dead_lettered" in metrics
            assert "signalman_records_processed" in metrics
    finally:
        await app.stop()


@pytest.mark.failure
async def test_redis_restart_loses_history_subscribers_get_a_gap_then_events(
    kafka_broker: Any, postgres_server: Any, redis_factory: Any
) -> None:
    redis = redis_factory()
    cfg = kafka_config(kafka_broker, redis, postgres_server)
    app = SignalmanApp(cfg, tokens=parse_tokens(TOKENS))
    await app.start()
    client = SignalmanClient(f"127.0.0.1:{app.port}", token="ta")
    sink = KafkaSink(cfg.kafka_bootstrap, topic=cfg.topic, source="test")
    try:
        async with client.subscribe(["streams"], resume_from={"streams": ("", 0)}) as sub:
            sink.emit(Event("stream.started", "acme", {"seq": 0}))
            first = await sub.get(20)
            assert isinstance(first, pb.Event)
            redis.restart()  # no persistence: the history and its epoch are gone
            for i in range(1, 4):
                sink.emit(Event("stream.started", "acme", {"seq": i}))
            # Processing waits for Redis (nothing committed meanwhile), the subscriber is told
            # explicitly that history changed, then receives what came after.
            gap = await sub.get(30)
            assert isinstance(gap, Gap) and gap.epoch != first.epoch
            seqs = []
            while len(seqs) < 3:
                item = await sub.get(30)
                assert isinstance(item, pb.Event)
                seqs.append(json.loads(item.data_json)["seq"])
            assert seqs == [1, 2, 3]
    finally:
        sink.close()
        await client.close()
        await app.stop()
