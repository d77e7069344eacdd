"""The backing stores over TLS (issue 13 item 4), against real servers started with TLS only
and client certificates required: Redis through ``rediss://`` with the platform's connection
factory (its counted, hiredis-packed connections kept), PostgreSQL with ``sslmode=verify-full``
through the fencing locks' dedicated connection; and the HA stores of ``./dev up --tls
--ha-stores``: a Sentinel failover with every Redis hop over TLS, a PostgreSQL standby
streaming over TLS and promoted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from pkg.common import redisconn
from pkg.coord.advisory import PartitionLocks
from pkg.devstack.certs import CertificateAuthority
from pkg.devstack.servers import (
    PostgresServer,
    PostgresStandby,
    RedisHA,
    ServerProcess,
    multi_host_dsn,
    redis_command,
    remove_run_dir,
)

pytestmark = pytest.mark.integration


async def test_redis_over_tls_keeps_the_packed_counted_connections(
    ca: CertificateAuthority, redis_factory: Callable[..., ServerProcess]
) -> None:
    server = redis_factory(tls=ca.issue("redis"))
    url = server.url  # type: ignore[attr-defined]
    assert url.startswith("rediss://")
    for bounded in (True, False):
        client = redisconn.connect(
            url,
            name="tls-test",
            hiredis_packing=True,
            decode_responses=True,
            **({"max_connections": 4, "blocking_timeout": 2.0} if bounded else {}),
        )
        try:
            cls = client.connection_pool.connection_class
            assert issubclass(cls, aioredis.SSLConnection)
            assert issubclass(cls, redisconn._HiredisPacking)  # the C packer is kept
            await client.set("tls:k", "v")
            assert await client.get("tls:k") == "v"
            counters = redisconn.stats(client)
            assert counters is not None and counters.connects >= 1  # counted like plaintext
        finally:
            await client.aclose()


async def test_held_connections_batch_commands_over_tls(
    ca: CertificateAuthority, redis_factory: Callable[..., ServerProcess]
) -> None:
    # Their writes go straight to the (TLS) transport when nothing is queued on it.
    server = redis_factory(tls=ca.issue("redis"))
    client = redisconn.connect(server.url, name="tls-held", hiredis_packing=True)  # type: ignore[attr-defined]
    try:
        lane = redisconn.HeldConnection(client)
        for i in range(50):
            replies = await lane.execute([("SET", f"h{i}", i), ("GET", f"h{i}")])
            assert replies == [b"OK", str(i).encode()]
        calls = redisconn.BatchedCalls(client)
        replies = await asyncio.gather(*(calls.call("INCR", "tls:n") for _ in range(300)))
        assert sorted(replies) == list(range(1, 301))
    finally:
        await client.aclose()


async def test_redis_tls_connections_share_one_context_until_a_certificate_file_changes(
    ca: CertificateAuthority, redis_factory: Callable[..., ServerProcess]
) -> None:
    # redis-py builds an SSLContext per connection (the system CA store read each time, ~30 ms
    # of CPU on the event loop): a pool that grows under load stalls its process.
    server = redis_factory(tls=ca.issue("redis"))
    me = ca.issue("redis-user")
    url = (
        f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca.ca_path}"
        f"&ssl_certfile={me.cert}&ssl_keyfile={me.key}"
    )
    client = redisconn.connect(url, name="tls-shared", socket_timeout=5)
    pool = client.connection_pool

    async def contexts(n: int) -> list[object]:
        conns = [await pool.get_connection() for _ in range(n)]  # n connections at once
        try:
            for conn in conns:
                await conn.send_command("PING")
                assert await conn.read_response() in (b"PONG", "PONG")
            return [conn._writer.get_extra_info("sslcontext") for conn in conns]  # type: ignore[attr-defined]
        finally:
            for conn in conns:
                await pool.release(conn)
                await conn.disconnect()

    try:
        first = await contexts(3)
        assert first[0] is not None and all(c is first[0] for c in first)
        ca.issue("redis-user")  # rotation: a new key and certificate in the same files
        second = await contexts(2)
        assert second[0] is not first[0] and all(c is second[0] for c in second)
    finally:
        await client.aclose()


async def test_redis_over_tls_refuses_plaintext_and_clients_without_a_certificate(
    ca: CertificateAuthority, redis_factory: Callable[..., ServerProcess]
) -> None:
    server = redis_factory(tls=ca.issue("redis"))
    plain = redisconn.connect(f"redis://127.0.0.1:{server.port}/0", socket_timeout=2)
    no_cert = redisconn.connect(
        f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca.ca_path}", socket_timeout=2
    )
    try:
        for client in (plain, no_cert):
            with pytest.raises((redis.exceptions.ConnectionError, OSError)):
                await client.ping()
    finally:
        await plain.aclose()
        await no_cert.aclose()


async def test_postgres_over_tls_with_verify_full_holds_fenced_locks(
    ca: CertificateAuthority, postgres_factory: Callable[..., ServerProcess]
) -> None:
    server = postgres_factory(tls=ca.issue("postgres"))
    dsn = server.dsn  # type: ignore[attr-defined]
    assert "sslmode=verify-full" in dsn
    locks = PartitionLocks(dsn, "tls-test")
    try:
        await locks.connect()
        assert await locks.query("fetchval", "SELECT ssl FROM pg_stat_ssl WHERE pid = "
                                 "pg_backend_pid()") is True  # fmt: skip
        assert await locks.acquire_fenced("tls-topic/0") >= 1
    finally:
        await locks.close()
    # Plaintext, and TLS without a client certificate, are refused by the server.
    base = dsn.split("?", 1)[0]
    no_cert = f"{base}?sslmode=verify-full&sslrootcert={ca.ca_path}"
    for refused in (f"{base}?sslmode=disable", no_cert):
        with pytest.raises((asyncpg.PostgresError, OSError, ConnectionError)):
            conn = await asyncpg.connect(refused, timeout=5)
            await conn.close()


async def test_sentinel_failover_over_tls_and_plaintext_to_a_sentinel_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    # Sentinel timings as tests/stores' (a failover in about a second).
    ha = RedisHA(tmp_path / "ha", replicas=1, down_after_ms=500, failover_timeout_ms=2000,
                 min_replicas_to_write=0, tls=ca.issue)  # fmt: skip
    client: aioredis.Redis | None = None
    try:
        await asyncio.to_thread(ha.start)  # settled: the Sentinels agree, the replica is linked
        assert ha.spec.startswith("rediss+sentinel://")
        sentinel = ha.sentinel_servers[0].port
        # Plaintext to a TLS Sentinel, and TLS without a client certificate: refused.
        with contextlib.suppress(OSError):
            assert not redis_command(sentinel, "PING", timeout=2).startswith("+PONG")
        no_cert = ssl.create_default_context(cafile=str(ca.ca_path))
        with (
            socket.create_connection(("127.0.0.1", sentinel), timeout=2) as raw,
            pytest.raises(OSError),  # (ssl.SSLError is one)
            no_cert.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"PING\r\n")  # TLS 1.3: the refusal comes with the reply
            if not tls.recv(16):
                raise ConnectionResetError("closed without a reply")
        # The Sentinels found each other at their TLS ports (nothing else listens).
        others = ha.command(sentinel, "SENTINEL", "SENTINELS", ha.master_name)
        for other in ha.sentinel_servers[1:]:
            assert str(other.port) in others
        client = redisconn.connect(ha.spec, name="tls-ha", hiredis_packing=True,
                                   decode_responses=True, socket_timeout=1,
                                   socket_connect_timeout=1)  # fmt: skip
        cls = client.connection_pool.connection_class
        assert issubclass(cls, aioredis.SSLConnection) and issubclass(
            cls, redisconn._HiredisPacking
        )
        await client.set("ha:k", "before")
        old = ha.primary_port()
        assert old is not None
        ha.server(old).kill()
        new = await asyncio.to_thread(ha.wait_primary_change, old, 30.0)
        for _ in range(100):  # the pool reconnects to the promoted replica
            with contextlib.suppress(redis.exceptions.ConnectionError, TimeoutError):
                await client.set("ha:k2", "after")
                break
            await asyncio.sleep(0.1)
        assert await client.get("ha:k2") == "after"
        assert await client.get("ha:k") == "before"  # replicated over TLS before the kill
        counters = redisconn.stats(client)
        assert counters is not None and counters.primary == f"127.0.0.1:{new}"
        assert counters.failovers >= 1
    finally:
        if client is not None:
            await client.aclose()
        ha.stop()
        ha.cleanup()


async def test_postgres_standby_streams_over_tls_and_serves_after_promotion(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    primary = PostgresServer(run_dir=tmp_path / "pg", tls=ca.issue("postgres"))
    standby = PostgresStandby(primary, run_dir=tmp_path / "pg-standby",
                              tls=ca.issue("postgres-standby"))  # fmt: skip
    dsn = multi_host_dsn(primary, standby)
    assert "sslmode=verify-full" in dsn
    try:
        await asyncio.to_thread(primary.start)
        await asyncio.to_thread(standby.start)
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
            # The WAL sender of the standby's (TLS) connection.
            for _ in range(100):
                rows = await conn.fetch(
                    "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)"
                    " WHERE r.state = 'streaming'"
                )
                if rows:
                    break
                await asyncio.sleep(0.1)
            assert [r["ssl"] for r in rows] == [True]
            # (insert, not write, position: the servers run with synchronous_commit=off)
            lsn = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        finally:
            await conn.close()
        replica = await asyncpg.connect(standby.dsn, timeout=10)  # verify-full to the standby
        try:
            for _ in range(100):  # the insert replayed before the primary dies
                if await replica.fetchval(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn
                ):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the standby did not replay the insert within 10 s")
        finally:
            await replica.close()
        primary.kill()
        await asyncio.to_thread(standby.promote)
        conn = await asyncpg.connect(dsn, timeout=10)  # the multi-host DSN finds the promoted
        try:
            assert await conn.fetchval("SELECT inet_server_port()") == standby.port
            assert await conn.fetchval("SELECT v FROM t") == 7
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await conn.close()
    finally:
        for server in (standby, primary):
            server.stop()
            remove_run_dir(server)
