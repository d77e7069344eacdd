"""KafkaSink against a real broker: keyed delivery, and a caller that never blocks on Kafka."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from pkg.events import Event
from pkg.events.factory import build_sink
from pkg.events.kafka import KafkaSink
from tests.signalman.conftest import wait_until

pytestmark = pytest.mark.integration


async def consume_all(bootstrap: str, topic: str, expected: int, wait_s: float = 20.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(records) < expected and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


async def test_sink_publishes_envelopes_keyed_by_tenant(kafka_broker: Any) -> None:
    topic = "sink-keyed"
    sink = build_sink(kafka_broker.bootstrap, source="foghorn")
    assert isinstance(sink, KafkaSink)
    sink.topic = topic
    try:
        for i in range(20):
            sink.emit(Event("stream.started", "acme" if i % 2 else "globex", {"i": i}))
        await wait_until(lambda: sink.sent == 20)
    finally:
        await asyncio.to_thread(sink.close)
    records = await consume_all(kafka_broker.bootstrap, topic, 20)
    assert len(records) == 20
    for rec in records:
        body = json.loads(rec.value)
        assert rec.key.decode() == body["tenant"]
        assert body["v"] == 1 and body["source"] == "foghorn" and body["id"]
    acme = [json.loads(r.value)["data"]["i"] for r in records if r.key == b"acme"]
    assert acme == sorted(acme)  # one tenant = one partition = produce order


async def test_emit_never_blocks_when_kafka_is_down(
    kafka_factory: Callable[..., Any],
) -> None:
    broker = kafka_factory()
    broker.pause()  # connections hang: worse than refused
    sink = KafkaSink(broker.bootstrap, source="foghorn", topic="sink-outage", buffer_size=1_000,
                     request_timeout_s=1.0)  # fmt: skip
    try:
        # Emit from a thread with a watchdog: if emit ever blocked, the thread would not finish.
        done = threading.Event()

        def produce() -> None:
            for i in range(3_000):
                sink.emit(Event("stream.started", "acme", {"i": i}))
            done.set()

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        await wait_until(done.is_set, timeout=20)
        assert sink.buffered == 1_000  # bounded
        assert sink.dropped == 2_000  # counted, never raised
        assert not sink.connected
        broker.resume()
        await wait_until(lambda: sink.sent == 1_000, timeout=30)
    finally:
        broker.resume()
        await asyncio.to_thread(sink.close)
    records = await consume_all(broker.bootstrap, "sink-outage", 1_000)
    assert [json.loads(r.value)["data"]["i"] for r in records] == list(range(1_000))


def test_emit_after_close_is_dropped_not_raised() -> None:
    sink = KafkaSink("127.0.0.1:1", autostart=False)
    sink.close(flush_timeout=0.1)
    sink.emit(Event("stream.started", "acme", {}))
    assert sink.dropped == 1


class HeldAcks:
    """Stands in for aiokafka's producer: records what was sent, acks only when told to."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.futures: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> Any:
        assert self.loop is not None
        future: asyncio.Future[None] = self.loop.create_future()
        self.futures.append(future)
        self.sent.append(json.loads(value)["data"]["i"])
        return future

    async def stop(self) -> None:
        return None

    def ack_all(self) -> None:
        def ack() -> None:
            for future in self.futures:
                if not future.done():
                    future.set_result(None)

        assert self.loop is not None
        self.loop.call_soon_threadsafe(ack)


@pytest.mark.timeout(30)
async def test_events_emitted_while_a_batch_waits_for_its_ack_are_sent_without_waiting() -> None:
    producer = HeldAcks()
    sink = KafkaSink("unused:0", producer_factory=lambda: producer)
    try:
        sink.emit(Event("stream.started", "acme", {"i": 0}))
        await wait_until(lambda: producer.sent == [0])
        # The first batch is still unacknowledged: the next event must not queue behind it.
        sink.emit(Event("stream.started", "acme", {"i": 1}))
        await wait_until(lambda: producer.sent == [0, 1])
        assert sink.sent == 0 and sink.buffered == 2  # kept until acknowledged
        producer.ack_all()
        await wait_until(lambda: sink.sent == 2 and sink.buffered == 0)
    finally:
        producer.ack_all()
        await asyncio.to_thread(sink.close, 1.0)


def test_the_sink_partitions_keys_exactly_like_aiokafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from pkg.events.kafka import KeyHashCache

    cached, default = KeyHashCache(max_keys=50), DefaultPartitioner()
    for partitions in ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0]):
        for _ in range(2):  # the second round from the cache (past max_keys: computed again)
            for i in range(120):
                key = f"tenant-{i}".encode()
                assert cached(key, partitions, partitions) == default(key, partitions, partitions)
    assert cached(None, [0, 1], [1]) == 1  # keyless: any available partition


def test_emitted_events_are_counted_for_metrics_without_an_add_per_event() -> None:
    from pkg.common.metrics import process_metrics

    sink = KafkaSink("127.0.0.1:1", topic="counted-topic", autostart=False)
    for i in range(3):
        sink.emit(Event("stream.started", "acme", {"n": i}))
    text = process_metrics().text().decode()
    assert sink.emitted == 3
    assert 'events_emitted_total{topic="counted-topic"} 3.0' in text
