"""Wiring of one Signalman replica: history, hub, processor, group member, duties, servers.

``SignalmanApp(cfg)`` builds everything from the config (embedded when no Kafka is configured) and
is what ``__main__`` runs and what tests start in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api_realtime.config import SignalmanConfig
from api_realtime.handlers import SERVICE, SignalmanServicer, add_to_server
from pkg.common.auth import BearerAuthInterceptor, static_authenticator, tokens_from_env
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.grpcserver import GrpcServer, ServiceBinding, build_server
from pkg.common.metrics import process_metrics
from pkg.common.telemetry import CONTENT_TYPE, prometheus_text
from pkg.coord.advisory import AdvisoryLease
from signalman import processor as processor_metrics
from signalman.history import History
from signalman.history.memory import MemoryHistory
from signalman.hub import Hub
from signalman.processor import DeadLetter, Processor
from signalman.singleton import SingletonDuties

log = structlog.get_logger("api_realtime.server")


async def _no_dead_letter_topic(letter: DeadLetter) -> None:
    # Embedded mode rejects bad events at the Publish call, so nothing reaches here; keep a log.
    log.warning("dead_letter_without_kafka", reason=letter.reason)


class SignalmanApp:
    """One replica. ``start()`` serves, ``stop()`` drains and releases everything it holds."""

    def __init__(
        self,
        cfg: SignalmanConfig,
        *,
        tokens: dict[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        serve_http: bool = True,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.embedded = not cfg.kafka_bootstrap
        self.history: History = self._build_history()
        self.dlq: Any = None
        dead_letter = _no_dead_letter_topic
        if not self.embedded:
            from signalman.deadletter import DeadLetterProducer

            self.dlq = DeadLetterProducer(cfg.kafka_bootstrap, cfg.dlq_topic)
            dead_letter = self.dlq
        self.processor = Processor(self.history, dead_letter, clock)
        processor_metrics.register(process_metrics(), self.processor)
        self.hub = Hub(
            self.history,
            buffer=cfg.subscriber_buffer,
            max_per_tenant=cfg.max_connections_per_tenant,
            max_channels=cfg.max_channels_per_session,
            clock=clock,
        )
        self.locks: Any = None
        self.member: Any = None
        redrive = lag = None
        if not self.embedded:
            from signalman.consumer import GroupMember
            from signalman.deadletter import Redriver
            from signalman.ownership import PartitionLocks
            from signalman.singleton import GroupLag

            if cfg.postgres_dsn:
                self.locks = PartitionLocks(
                    cfg.postgres_dsn, cfg.replica_id, grace_s=cfg.lock_grace_s, clock=clock
                )
            else:
                log.warning(
                    "ownership_unfenced", reason="no SIGNALMAN_POSTGRES_DSN: run one replica"
                )
            self.member = GroupMember(cfg, self.processor, self.history, self.locks, clock=clock)
            self.redriver = Redriver(
                cfg.kafka_bootstrap, cfg.topic, cfg.dlq_topic, cfg.group_id,
                delay_s=cfg.redrive_delay_s, max_attempts=cfg.redrive_max_attempts, clock=clock,
            )  # fmt: skip
            redrive = self.redriver.run_once
            lag = GroupLag(cfg.kafka_bootstrap, cfg.topic, cfg.group_id)
        lease = AdvisoryLease(self.locks, cfg.group_id) if self.locks is not None else None
        self.duties = SingletonDuties(
            cfg.group_id, lease, self.history,
            interval_s=cfg.duties_interval_s, history_maxlen=cfg.history_maxlen,
            retention_s=cfg.history_retention_s, redrive=redrive, lag=lag, clock=clock,
        )  # fmt: skip
        self.duties.register_metrics(process_metrics())
        self.hub.register_metrics(process_metrics())
        self.servicer = SignalmanServicer(
            self.hub, self.processor, self.stats, embedded=self.embedded
        )
        auth = BearerAuthInterceptor(static_authenticator(tokens or tokens_from_env()))
        self.grpc: GrpcServer = build_server(
            [ServiceBinding(add_to_server, self.servicer, SERVICE)],
            port=cfg.grpc_port,
            host=cfg.host,
            interceptors=[auth],
            max_message_bytes=cfg.max_message_bytes,
        )
        self.serve_http = serve_http
        self._http: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def _build_history(self) -> History:
        cfg = self.cfg
        if cfg.redis_url:
            from signalman.history.redis import RedisHistory

            return RedisHistory(cfg.redis_url, prefix=cfg.redis_prefix, max_len=cfg.history_maxlen)
        if cfg.kafka_bootstrap:
            log.warning(
                "history_not_shared",
                reason="no SIGNALMAN_REDIS_URL: subscribers only see this replica's partitions",
            )
        return MemoryHistory(max_len=cfg.history_maxlen)

    @property
    def port(self) -> int:
        return self.grpc.port

    def stats(self) -> dict[str, Any]:
        parts: list[tuple[str, int, int, int]] = []
        if self.member is not None:
            lag = self.member.lag()
            for tp, owned in sorted(self.member.owned.items(), key=lambda kv: kv[0].partition):
                parts.append((tp.topic, tp.partition, owned.fence, lag.get(tp, 0)))
        return {
            "replica_id": self.cfg.replica_id,
            "mode": "embedded" if self.embedded else "kafka",
            "partitions": parts,
            "singleton": self.duties.leader,
        }

    async def health(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"replica_id": self.cfg.replica_id, **self.stats()}
        ok = True
        if self.cfg.redis_url:
            try:
                await asyncio.wait_for(self.history.ping(), 1.0)  # type: ignore[attr-defined]
                detail["redis"] = "ok"
            except Exception as exc:
                detail["redis"] = f"down: {exc!r}"[:200]
                ok = False
        if self.locks is not None:
            detail["postgres_lock_connection"] = "ok" if self.locks.connected else "reconnecting"
        if self.member is not None:
            detail["kafka_consumer"] = "running" if self.member.consumer is not None else "starting"
        detail["subscribers"] = len(self.hub.sessions)
        detail["status"] = "ok" if ok else "degraded"
        # The handful of numbers a status view (./dev up) shows on one line.
        detail["figures"] = {
            "partitions": len(detail["partitions"]),
            "consumer_lag": sum(lag for *_, lag in detail["partitions"]),
            "subscribers": detail["subscribers"],
            "slow_dropped": self.hub.dropped_total,
            "singleton": bool(detail["singleton"]),
            # Dead replicas this one removed from the consumer group (membership.PeerWatch).
            "dead_members_removed": (
                self.member.peers.removed
                if self.member is not None and self.member.peers is not None
                else 0
            ),
        }
        return ok, detail

    def _http_app(self) -> Starlette:
        async def health(_: Request) -> Response:
            ok, detail = await self.health()
            return JSONResponse(detail, status_code=200 if ok else 503)

        async def metrics(_: Request) -> Response:
            return Response(prometheus_text(), media_type=CONTENT_TYPE)

        return Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])

    async def start(self) -> None:
        await self.grpc.start()
        if self.member is not None:
            self._tasks.append(asyncio.create_task(self.member.run(), name="group-member"))
        self._tasks.append(asyncio.create_task(self.duties.run(), name="singleton-duties"))
        if self.serve_http:
            config = uvicorn.Config(
                self._http_app(), host=self.cfg.host, port=self.cfg.http_port,
                log_level="warning", lifespan="off",
            )  # fmt: skip
            self._http = uvicorn.Server(config)
            self._tasks.append(asyncio.create_task(self._http.serve(), name="http"))
        log.info(
            "signalman_started",
            replica=self.cfg.replica_id,
            grpc_port=self.port,
            http_port=self.cfg.http_port if self.serve_http else None,
            mode="embedded" if self.embedded else "kafka",
        )

    async def stop(self) -> None:
        await self.hub.close()
        await self.grpc.stop(grace=1.0)
        self.duties.stop()
        if self.member is not None:
            await self.member.stop()
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks:
            if task.get_name() != "http":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10.0)
        if self.member is not None:
            await self.member._stop_consumer()
            await self.redriver.close()
            if self.duties.group_lag is not None:
                await self.duties.group_lag.close()
        if self.dlq is not None:
            await self.dlq.close()
        await self.history.close()
