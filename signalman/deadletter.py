"""The dead-letter topic: where poison records go with their reason, and the re-drive duty.

A dead-lettered record keeps its key and bytes; headers say why (``reason``), whether a newer
consumer could read it (``retryable``), where it came from (``source``) and how many re-drives it
had (``attempts``). The re-drive duty (one replica, see ``singleton``) sends retryable records back
to the main topic after a delay, a bounded number of times; the rest stay for humans.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.kafkaconn import kafka_options
from signalman.kafka_clients import start_client
from signalman.processor import DeadLetter

log = structlog.get_logger("signalman.deadletter")


def attempts_of(headers: Any) -> int:
    """How many times a record was re-driven already (0 for a first delivery)."""
    try:
        return max(0, int(_header(headers, "attempts") or 0))
    except ValueError:
        return 0


def _header(headers: Any, name: str) -> str:
    for key, value in headers or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return ""


class DeadLetterProducer:
    """Sends poison records to ``<topic>.dlq``; waits for the ack (the partition's commit waits
    for it, so a poison record is never lost)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: Any = None
        self._lock = asyncio.Lock()

    async def _get(self) -> Any:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(**kafka_options(self.bootstrap), acks="all")
                await start_client(producer)
                self._producer = producer
            return self._producer

    async def __call__(self, letter: DeadLetter) -> None:
        producer = await self._get()
        attempts = letter.attempts
        headers = [
            ("reason", letter.reason.encode()[:1000]),
            ("retryable", b"1" if letter.retryable else b"0"),
            ("source", f"{letter.source.topic}/{letter.source.partition}/"
                       f"{letter.source.offset}".encode()),
            ("attempts", str(attempts).encode()),
        ]  # fmt: skip
        await producer.send_and_wait(
            self.topic, letter.value if letter.value is not None else b"", key=letter.key,
            headers=headers,
        )  # fmt: skip

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()


class Redriver:
    """Re-drives retryable dead letters to the main topic (run by the singleton holder only)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        dlq_topic: str,
        group_id: str,
        *,
        delay_s: float,
        max_attempts: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.group_id = f"{group_id}.redrive"
        self.delay_s = delay_s
        self.max_attempts = max_attempts
        self.clock = clock
        self._consumer: Any = None
        self._producer: Any = None
        self.redriven = 0
        self.parked = 0

    async def _ensure(self) -> bool:
        """Start the clients and assign every partition of the dead-letter topic; False while
        that topic does not exist yet (nothing to re-drive)."""
        if self._consumer is None:
            # Assigned, never subscribed: the consumer joins no group. Only the singleton holder
            # re-drives, so the lease already excludes the others; a group join only cost time
            # (the broker holds a join for seconds, and a replica stopping while its re-driver
            # joined waited 5 s for it). The group id is where the offsets are committed.
            consumer = AIOKafkaConsumer(
                **kafka_options(self.bootstrap),
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await start_client(consumer)
            self._consumer = consumer
        if self._producer is None:
            producer = AIOKafkaProducer(**kafka_options(self.bootstrap), acks="all")
            await start_client(producer)
            self._producer = producer
        parts = self._consumer.partitions_for_topic(self.dlq_topic)
        if not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.dlq_topic)
        if not parts:
            return False
        wanted = {TopicPartition(self.dlq_topic, p) for p in parts}
        if wanted != self._consumer.assignment():
            self._consumer.assign(sorted(wanted))  # from the committed offsets, else earliest
        return True

    async def run_once(self) -> int:
        """Handle what is due in the dead-letter topic; returns records re-driven."""
        if not await self._ensure():
            return 0
        batches = await self._consumer.getmany(timeout_ms=200, max_records=200)
        sent = 0
        for tp, records in batches.items():
            commit_to = None
            for rec in records:
                retryable = _header(rec.headers, "retryable") == "1"
                attempts = attempts_of(rec.headers)
                if retryable and attempts < self.max_attempts:
                    age = self.clock.time() - rec.timestamp / 1000.0
                    if age < self.delay_s:
                        self._consumer.seek(tp, rec.offset)  # not due yet: look again later
                        break
                    await self._producer.send_and_wait(
                        self.topic, rec.value, key=rec.key,
                        headers=[("attempts", str(attempts + 1).encode())],
                    )  # fmt: skip
                    sent += 1
                    self.redriven += 1
                else:
                    self.parked += 1  # stays in the topic for humans; nothing to do
                commit_to = rec.offset + 1
            if commit_to is not None:
                await self._consumer.commit({tp: commit_to})
        if sent:
            log.info("dead_letters_redriven", count=sent)
        return sent

    async def close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._consumer = self._producer = None
