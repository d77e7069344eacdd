"""The dev stack's real servers start, answer, pause and stop by pid."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.integration


async def test_redis_server_answers_and_restarts_on_the_same_port(redis_factory) -> None:
    server = redis_factory()
    client = aioredis.from_url(server.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        port = server.port
        await client.aclose()
        server.restart()
        assert server.port == port
        client = aioredis.from_url(server.url)
        assert await client.get("k") is None  # no persistence: a restart starts empty
    finally:
        await client.aclose()


async def test_postgres_server_takes_advisory_locks(postgres_server) -> None:
    a = await asyncpg.connect(postgres_server.dsn)
    b = await asyncpg.connect(postgres_server.dsn)
    try:
        assert await a.fetchval("select pg_try_advisory_lock(42)") is True
        assert await b.fetchval("select pg_try_advisory_lock(42)") is False
        await a.close()
        await asyncio.sleep(0.1)
        assert await b.fetchval("select pg_try_advisory_lock(42)") is True
    finally:
        await b.close()


async def test_kafka_broker_round_trips_a_message(kafka_broker) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic("servers-smoke", num_partitions=2, replication_factor=1)]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("servers-smoke", b"hello", key=b"t1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "servers-smoke",
        bootstrap_servers=kafka_broker.bootstrap,
        group_id="smoke",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        got = await asyncio.wait_for(consumer.getone(), timeout=20)
        assert got.value == b"hello"
    finally:
        await consumer.stop()
