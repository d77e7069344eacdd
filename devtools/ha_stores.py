"""``./dev up --ha-stores``: the stores as they run in production, on 127.0.0.1.

Redis is one primary, two replicas and three Sentinels (quorum 2); services get the
``redis+sentinel://`` spec. PostgreSQL is a primary and a streaming standby
(``pg_basebackup -R``); services get a multi-host DSN with ``target_session_attrs=read-write``.
Nothing promotes the standby by itself: the ``postgres-failover`` drill does it, as an operator
or a Patroni-style manager would. The status view shows which server is primary.

With ``--tls`` every hop of the stores runs TLS with client certificates from the run's CA
(docs/tls.md): services to the Sentinels and to the Redis primary (``rediss+sentinel://``),
replicas to the primary, Sentinels to the servers and to each other, services to PostgreSQL and
the standby to its primary (``sslmode=verify-full``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from devtools.supervisor import Managed, RestartPolicy
from pkg.devstack.servers import (
    PostgresServer,
    PostgresStandby,
    RedisHA,
    multi_host_dsn,
)


@dataclass
class HaStores:
    """What ``start`` made: the Redis group and the PostgreSQL pair."""

    redis: RedisHA
    postgres: PostgresServer
    standby: PostgresStandby
    tls: bool = False

    def status_lines(self) -> list[str]:
        """Which Redis and which PostgreSQL are primary (for the status view)."""
        primary = self.redis.primary_port()
        epoch = self.redis.failover_epoch()
        roles = []
        for i, server in enumerate(self.redis.servers):
            role = "down"
            with contextlib.suppress(OSError, ValueError):
                role = self.redis.info(server.port).get("role", "?") if server.running else "down"
            roles.append(f"redis-{i}:{server.port}={role}")
        pg_primary = "none"
        if self.standby.running and self.standby.is_primary():
            pg_primary = f"postgres-standby:{self.standby.port} (promoted)"
        elif self.postgres.running:
            pg_primary = f"postgres:{self.postgres.port}"
        lines = [
            f"redis primary:     127.0.0.1:{primary} (failover epoch {epoch}); " + " ".join(roles),
            f"postgres primary:  {pg_primary}",
        ]
        if self.tls:
            lines.append(
                "stores over TLS:   services->Sentinels, services->Redis primary, replicas->"
                "primary, Sentinels->servers and Sentinels; services->PostgreSQL and standby->"
                "primary (verify-full); client certificates required on every hop"
            )
        return lines


def start(stack: Any) -> HaStores:
    """Start the HA stores under the stack's supervisor and point the backends at them."""
    run_dir = stack.run_dir
    tls = stack.tls
    redis = RedisHA(run_dir / "redis-ha", tls=tls.cert if tls is not None else None)
    # A Redis without persistence restarted before Sentinel saw it down comes back EMPTY, still
    # the primary Sentinel knows, and its replicas resync to that emptiness (Redis' replication
    # docs warn against auto-restarting such a primary). So a crashed Redis of the set comes back
    # only after Sentinel has had time to fail over (down-after, then the election): Sentinel
    # then turns the returning server into a replica of the new primary. A 1 s restart lost 11
    # of 489 events in the redis-failover drill, with no failover at all.
    later = 3.0 * redis.sentinel_servers[0].down_after_ms / 1000 + 3.0
    for i, server in enumerate(redis.servers):
        policy = RestartPolicy(initial=later, cap=max(60.0, later))
        stack.sup.add(Managed(f"redis-{i}", server, kind="server", policy=policy))
    for i, sentinel in enumerate(redis.sentinel_servers):
        stack.sup.add(Managed(f"sentinel-{i}", sentinel, kind="server"))
    redis.wait_settled()
    pg = PostgresServer(run_dir=run_dir / "postgres", **stack.server_tls("postgres"))
    stack.sup.add(Managed("postgres", pg, kind="server"))
    standby = PostgresStandby(
        pg, run_dir=run_dir / "postgres-standby", **stack.server_tls("postgres-standby")
    )
    stack.sup.add(Managed("postgres-standby", standby, kind="server"))
    stack.backends.redis_url = redis.spec
    stack.backends.postgres_dsn = multi_host_dsn(pg, standby)
    stores = HaStores(redis, pg, standby, tls=tls is not None)
    stack.notes.append(f"redis (Sentinel): {redis.spec}")
    stack.notes.append(f"postgres (multi-host): {stack.backends.postgres_dsn}")
    return stores
