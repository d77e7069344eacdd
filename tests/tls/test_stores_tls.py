"""The backing stores over TLS (issue 13 item 4), against real servers started with TLS only
and client certificates required: Redis through ``rediss://`` with the platform's connection
factory (its counted, hiredis-packed connections kept), PostgreSQL with ``sslmode=verify-full``
through the fencing locks' dedicated connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from pkg.common import redisconn
from pkg.coord.advisory import PartitionLocks
from pkg.devstack.certs import CertificateAuthority
from pkg.devstack.servers import ServerProcess

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
