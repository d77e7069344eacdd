"""Singleton duties, run by exactly one replica: history trimming, dead-letter re-drive, lag.

The replica that holds the singleton lease (``pkg.coord.protocols.Lease``; with PostgreSQL
the singleton advisory lock on its dedicated connection, ``pkg.coord.advisory.AdvisoryLease``)
runs them; the others keep trying to take it, so when the holder dies (its connection closes,
its lock goes) one of them takes over within ``interval_s``. Without PostgreSQL (one replica)
the duties run locally.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.kafkaconn import kafka_options
from pkg.common.metrics import Metrics, Sample, per_source
from pkg.coord.protocols import Lease
from signalman.history import History
from signalman.kafka_clients import start_client

log = structlog.get_logger("signalman.singleton")


class GroupLag:
    """Consumer lag of the whole group per partition (end offset - committed offset)."""

    def __init__(self, bootstrap: str, topic: str, group_id: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.lag: dict[int, int] = {}
        self._consumer: Any = None

    async def refresh(self) -> dict[int, int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is None:
            # Same group id to read its commits, but never subscribes: it does not join the group.
            consumer = AIOKafkaConsumer(
                **kafka_options(self.bootstrap), group_id=self.group_id, enable_auto_commit=False
            )
            # Stopped again if the start fails or is cancelled (the replica stopping meanwhile).
            await start_client(consumer)
            self._consumer = consumer
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        if not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        if not tps:
            return {}
        ends = await self._consumer.end_offsets(tps)
        lag = {}
        for tp in tps:
            committed = await self._consumer.committed(tp)
            lag[tp.partition] = max(0, ends[tp] - (committed or 0))
        self.lag = lag
        return lag

    async def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None


class SingletonDuties:
    """Runs ``duties`` every ``interval_s`` while this replica holds ``lease`` (any
    ``pkg.coord.protocols.Lease``: with PostgreSQL, ``pkg.coord.advisory.AdvisoryLease`` over
    the replica's lock connection; None: no coordination, one replica, run locally)."""

    def __init__(
        self,
        name: str,
        lease: Lease | None,
        history: History,
        *,
        interval_s: float,
        history_maxlen: int,
        retention_s: float,
        redrive: Callable[[], Awaitable[int]] | None = None,
        lag: GroupLag | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.name = name
        self.lease = lease
        self.history = history
        self.interval_s = interval_s
        self.history_maxlen = history_maxlen
        self.retention_s = retention_s
        self.redrive = redrive
        self.group_lag = lag
        self.clock = clock
        self.leader = False
        self.trimmed = 0
        self._stop = asyncio.Event()

    def register_metrics(self, registry: Metrics) -> None:
        """Report the group's lag per partition while this replica is the singleton leader."""
        registry.gauge(
            "signalman_consumer_lag",
            "records not yet committed by the group, per partition (singleton leader only)",
            SingletonDuties._lag_samples, ("partition",), self,
        )  # fmt: skip
        registry.gauge(
            "signalman_singleton_leader",
            "1 while this replica runs the group's singleton duties (lag, trimming, re-drive)",
            per_source(lambda _: {}, lambda duties: 1.0 if duties.leader else 0.0), (), self,
        )  # fmt: skip

    def _lag_samples(self) -> list[Sample]:
        if not self.leader or self.group_lag is None:
            return []
        return [({"partition": str(p)}, v) for p, v in self.group_lag.lag.items()]

    async def _is_leader(self) -> bool:
        if self.lease is None:
            return True
        await self.lease.run_once()
        return self.lease.is_leader()

    async def run_once(self) -> None:
        leader = await self._is_leader()
        if leader != self.leader:
            log.info("singleton_" + ("acquired" if leader else "lost"), name=self.name)
            self.leader = leader
        if not leader:
            return
        min_time = self.clock.time() - self.retention_s
        for tenant in await self.history.tenants():
            self.trimmed += await self.history.trim(tenant, self.history_maxlen, min_time)
        if self.redrive is not None:
            await self.redrive()
        if self.group_lag is not None:
            await self.group_lag.refresh()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("singleton_duty_failed", error=repr(exc)[:200])
            await self.clock.asleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
