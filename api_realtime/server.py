"""Signalman's app: builds one replica from its config and runs its lifecycle.

The same shape as every service (docs/architecture.md): ``SignalmanApp(config)`` wires the
parts (history, processor, hub, group member and duties when Kafka is configured, handlers)
without I/O; ``start()`` brings them up in order (history probe, gRPC, group member, singleton
duties, HTTP, health following) and ``stop()`` takes them down in reverse; ``health()`` is the
one report that ``/health`` and gRPC health serve. With no Kafka configured it runs embedded
(memory history, events arrive through the Publish RPC).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from starlette.applications import Starlette

from api_realtime.access import SIGNALMAN_ACCESS
from api_realtime.config import SignalmanConfig
from api_realtime.handlers import SERVICE, SignalmanServicer, add_to_server
from pkg.common.app import Lifecycle
from pkg.common.auth import Principal, static_authenticator, tokens_from_env
from pkg.common.authz import AuthzInterceptor, HttpGuard
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.grpcserver import GrpcServer, ServiceBinding, build_server
from pkg.common.health import Dependency, HealthReport, Probe, Status
from pkg.common.httpserver import HttpServer, ops_routes
from pkg.common.metrics import per_source, process_metrics
from pkg.common.tls import identity_map
from pkg.coord.advisory import AdvisoryLease
from signalman import processor as processor_metrics
from signalman.history import History
from signalman.history.memory import MemoryHistory
from signalman.hub import Hub
from signalman.processor import DeadLetter, DeadLetterFn, Processor
from signalman.singleton import SingletonDuties

if TYPE_CHECKING:  # Kafka and PostgreSQL parts are imported only when configured
    from signalman.consumer import GroupMember
    from signalman.deadletter import DeadLetterProducer, Redriver
    from signalman.history.redis import RedisHistory
    from signalman.ownership import PartitionLocks

# Bytes of a ServerMessage around its events (channel, offset, epoch, batch framing).
MESSAGE_OVERHEAD = 1024
log = structlog.get_logger("api_realtime.server")

# No BDP probe from the server either (the subscribers' side: pkg.clients.signalman): it pings a
# client whenever a request arrives and its last probe is old enough, and a replica receives
# nothing but small subscribe requests. Side by side, 3,000 subscribers connecting (two rounds,
# 02:26 UTC, load 8-13): per subscribe 8.2 / 5.4 sendmsg and 10.9 / 6.5 recvmsg with it off,
# 8.9 / 6.3 and 12.5 / 9.1 with it on; 1,350 / 1,070 us of CPU against 1,407 / 1,267.
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.http2.bdp_probe", 0),)

# A stopping replica waits this long for its group member to commit, leave the group and
# release its locks before the rest of the stop cancels it.
LEAVE_BOUND_S = 10.0


async def _no_dead_letter_topic(letter: DeadLetter) -> None:
    # Embedded mode rejects bad events at the Publish call, so nothing reaches here; keep a log.
    log.warning("dead_letter_without_kafka", reason=letter.reason)


class SignalmanApp:
    """One Signalman replica: the Signalman gRPC service plus HTTP, on one event loop."""

    def __init__(
        self,
        config: SignalmanConfig,
        *,
        tokens: Mapping[str, Principal] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.lifecycle = Lifecycle("signalman")
        self.embedded = not config.kafka_bootstrap
        # The shared Redis history is probed in the background, so /health never waits on it.
        self._history_probe: Probe | None = None
        self._redis_history: RedisHistory | None = None  # the shared history, when configured
        self.history: History = self._build_history()
        self.dlq: DeadLetterProducer | None = None
        dead_letter: DeadLetterFn = _no_dead_letter_topic
        if not self.embedded:
            from signalman.deadletter import DeadLetterProducer

            self.dlq = DeadLetterProducer(config.kafka_bootstrap, config.dlq_topic)
            dead_letter = self.dlq
        # What one subscriber message may carry: gRPC's send limit less room for its framing.
        self.max_event_bytes = max(1024, config.max_message_bytes - MESSAGE_OVERHEAD)
        self.processor = Processor(
            self.history, dead_letter, clock, max_event_bytes=self.max_event_bytes
        )
        processor_metrics.register(process_metrics(), self.processor)
        self.hub = Hub(
            self.history,
            buffer=config.subscriber_buffer,
            max_per_tenant=config.max_connections_per_tenant,
            max_channels=config.max_channels_per_session,
            clock=clock,
        )
        self.locks: PartitionLocks | None = None
        self.member: GroupMember | None = None
        self.redriver: Redriver | None = None
        redrive = lag = None
        if not self.embedded:
            from signalman.consumer import GroupMember
            from signalman.deadletter import Redriver
            from signalman.ownership import PartitionLocks
            from signalman.singleton import GroupLag

            if config.postgres_dsn:
                self.locks = PartitionLocks(
                    config.postgres_dsn, config.replica_id, group=config.group_id,
                    grace_s=config.lock_grace_s, clock=clock,
                )  # fmt: skip
            else:
                log.warning(
                    "ownership_unfenced", reason="no SIGNALMAN_POSTGRES_DSN: run one replica"
                )
            self.member = GroupMember(config, self.processor, self.history, self.locks, clock=clock)
            self.redriver = Redriver(
                config.kafka_bootstrap, config.topic, config.dlq_topic, config.group_id,
                delay_s=config.redrive_delay_s, max_attempts=config.redrive_max_attempts,
                clock=clock,
            )  # fmt: skip
            redrive = self.redriver.run_once
            lag = GroupLag(config.kafka_bootstrap, config.topic, config.group_id)
        lease = AdvisoryLease(self.locks, config.group_id) if self.locks is not None else None
        self.duties = SingletonDuties(
            config.group_id, lease, self.history,
            interval_s=config.duties_interval_s, history_maxlen=config.history_maxlen,
            retention_s=config.history_retention_s, redrive=redrive, lag=lag, clock=clock,
        )  # fmt: skip
        self.duties.register_metrics(process_metrics())
        self.hub.register_metrics(process_metrics())
        if self.locks is not None:
            process_metrics().gauge(
                "signalman_postgres_timeline",
                "WAL timeline of the PostgreSQL primary holding this replica's locks (one "
                "more at each standby promotion; 0 before the first connection)",
                per_source(lambda _: {}, lambda locks: float(locks.timeline)), (), self.locks,
            )  # fmt: skip
        self.servicer = SignalmanServicer(
            self.hub,
            self.processor,
            self.stats,
            embedded=self.embedded,
            max_batch_bytes=self.max_event_bytes,
        )
        self._authenticator = static_authenticator(tokens_from_env() if tokens is None else tokens)
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self._member_task: asyncio.Task[Any] | None = None

    def _build_history(self) -> History:
        config = self.config
        if config.redis_url:
            from signalman.history import redis as redis_history

            history = redis_history.RedisHistory(
                config.redis_url,
                prefix=config.redis_prefix,
                max_len=config.history_maxlen,
                wait_timeout_ms=config.history_wait_ms,
            )
            redis_history.register(process_metrics(), history)
            self._history_probe = Probe(history.ping, interval_s=1.0, timeout_s=1.0)
            self._redis_history = history
            return history
        if config.kafka_bootstrap:
            log.warning(
                "history_not_shared",
                reason="no SIGNALMAN_REDIS_URL: subscribers only see this replica's partitions",
            )
        return MemoryHistory(max_len=config.history_maxlen)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    @property
    def port(self) -> int:
        """The gRPC port (what clients dial)."""
        return self.grpc_port

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_port(self) -> int:
        return self.http.port if self.http else 0

    def stats(self) -> dict[str, Any]:
        """Replica-level state: mode, owned partitions (topic, partition, fence, lag), whether
        this replica runs the singleton duties (GetStats and /health)."""
        parts: list[tuple[str, int, int, int]] = []
        if self.member is not None:
            lag = self.member.lag()
            for tp, owned in sorted(self.member.owned.items(), key=lambda kv: kv[0].partition):
                parts.append((tp.topic, tp.partition, owned.fence, lag.get(tp, 0)))
        return {
            "replica_id": self.config.replica_id,
            "mode": "embedded" if self.embedded else "kafka",
            "partitions": parts,
            "singleton": self.duties.leader,
        }

    # -- health --------------------------------------------------------------------------------
    def _dependencies(self, detail: dict[str, Any]) -> list[Dependency]:
        """The history store decides the status (no history, no delivery); the lock connection
        and the consumer are shown without changing it: while they are away the replica still
        serves its subscribers, and its partitions move to the other replicas."""
        deps: list[Dependency] = []
        probe = self._history_probe
        if probe is None:
            deps.append(Dependency("history", "memory"))
        else:
            up = probe.up is not False
            detail["redis"] = "ok" if up else f"down: {probe.reason}"[:200]
            deps.append(
                Dependency(
                    "history",
                    "redis",
                    Status.OK if up else Status.DEGRADED,
                    "" if up else f"redis down: {probe.reason}",
                )
            )
            replication = self._redis_history.replication if self._redis_history else None
            if replication is not None and replication.wanted:
                # Lagging replicas: appends go on (delivery is not held back), counted as
                # unreplicated; shown degraded without changing the replica's status.
                detail["history_replication"] = replication.as_dict()
                deps.append(
                    Dependency(
                        "history-replicas",
                        "redis",
                        Status.DEGRADED if replication.lagging else Status.OK,
                        "appends not acknowledged by a replica" if replication.lagging else "",
                        critical=False,
                    )
                )
        if self.locks is not None:
            connected = self.locks.connected
            detail["postgres_lock_connection"] = "ok" if connected else "reconnecting"
            deps.append(
                Dependency(
                    "locks",
                    "postgres",
                    Status.OK if connected else Status.DEGRADED,
                    "" if connected else "lock connection reconnecting",
                    critical=False,
                )
            )
        if self.member is not None:
            running = self.member.consumer is not None
            detail["kafka_consumer"] = "running" if running else "starting"
            deps.append(
                Dependency(
                    "consumer",
                    "kafka",
                    Status.OK if running else Status.DEGRADED,
                    "" if running else "consumer starting",
                    critical=False,
                )
            )
        return deps

    def health(self) -> HealthReport:
        """The one health report: status, dependencies, ownership, subscribers, figures."""
        detail: dict[str, Any] = self.stats()
        deps = self._dependencies(detail)
        detail["subscribers"] = len(self.hub.sessions)
        partitions = detail["partitions"]
        # The handful of numbers a status view (./dev up) shows on one line.
        figures: dict[str, int | float | str | bool | None] = {
            "partitions": len(partitions),
            "consumer_lag": sum(lag for *_, lag in partitions),
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
        return HealthReport.of(
            "signalman",
            self.config.replica_id,
            deps,
            figures,
            detail,
            stopping=self.lifecycle.stopping,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        lc = self.lifecycle
        lc.on_stop(self.history.close)  # last out: the stop itself still reads and writes it
        if self.dlq is not None:
            lc.on_stop(self.dlq.close)
        if self.duties.group_lag is not None:
            lc.on_stop(self.duties.group_lag.close)
        if self.redriver is not None:
            lc.on_stop(self.redriver.close)
        if self.member is not None:
            lc.on_stop(self.member.close)  # leaves the group, releases every partition lock
        if self._history_probe is not None:
            await lc.enter(self._history_probe.running())
        interceptor = AuthzInterceptor(
            self._authenticator,
            SIGNALMAN_ACCESS,
            identities=identity_map(self.config.tls.identities),
        )
        self.grpc = build_server(
            [ServiceBinding(add_to_server, self.servicer, SERVICE)],
            settings=self.config.grpc,
            interceptors=[interceptor],
            extra_options=GRPC_OPTIONS,
        )
        await self.grpc.start()
        lc.on_stop(self.grpc.stop, 0.0)  # drained by stop() already; here after a failed start
        if self.member is not None:
            self._member_task = lc.spawn(self.member.run(), "group-member")
        lc.spawn(self.duties.run(), "singleton-duties")
        http = self.config.http
        if http is not None:
            guard = HttpGuard(SIGNALMAN_ACCESS, self._authenticator)
            routes = guard.routes(ops_routes(self.health, detail_for=guard.is_operator))
            self.http = HttpServer(Starlette(routes=routes), http)
            await self.http.start()
            lc.on_stop(self.http.stop, 2.0)
        lc.spawn(self.grpc.follow(self.health), "grpc-health")
        log.info(
            "signalman_started",
            replica=self.config.replica_id,
            grpc_port=self.grpc_port,
            http_port=self.http_port or None,
            mode="embedded" if self.embedded else "kafka",
        )

    async def stop(self, grace: float = 1.0) -> None:
        """Hand the work over, then undo what ``start`` did, newest first.

        Health says not serving at once (HTTP and gRPC). Then, at the same time: the group
        member finishes its batch, commits, leaves the consumer group and releases its
        partition locks (bounded by ``LEAVE_BOUND_S``), so the other replicas take the
        partitions over now rather than after a session timeout; and subscriber sessions end
        with UNAVAILABLE "reconnect and resume" (clients resume from their offset on another
        replica: the history is shared). gRPC calls drain for ``grace`` seconds; then the
        duties, HTTP, the Kafka clients and the history close.
        """
        self.lifecycle.stopping = True
        started = self.clock.monotonic()
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        self.duties.stop()
        await asyncio.gather(self._leave_group(), self.hub.close())
        left_s = self.clock.monotonic() - started
        if self.grpc is not None:
            await self.grpc.stop(grace)
        await self.lifecycle.close()
        log.info("signalman_stopped", replica=self.config.replica_id, left_group_s=round(left_s, 3))

    async def _leave_group(self) -> None:
        """Stop the member's loop and wait for it to leave (commit, LeaveGroup, locks)."""
        if self.member is None:
            return
        await self.member.stop()
        task = self._member_task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), LEAVE_BOUND_S)
        except TimeoutError:
            log.warning("group_leave_slow", bound_s=LEAVE_BOUND_S)  # cancelled by close()
        except Exception as exc:
            log.warning("group_leave_failed", error=repr(exc)[:200])
