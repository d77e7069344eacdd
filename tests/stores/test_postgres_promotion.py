"""Signalman's advisory-lock fences across a PostgreSQL standby promotion: the promoted
standby lacked the last fence bumps (forced: the standby is paused and its WAL sender ended
while they are made), yet the fences issued after the promotion are above all of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from pkg.coord.advisory import TIMELINE_SPAN, PartitionLocks
from pkg.devstack.servers import PostgresServer, PostgresStandby, multi_host_dsn, remove_run_dir


async def _max_fence(port: int, topic: str) -> int:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    try:
        value = await conn.fetchval(
            "SELECT max(fence) FROM signalman_partition_fence WHERE topic = $1", topic
        )
        return int(value or 0)
    except asyncpg.UndefinedTableError:  # not replayed yet
        return 0
    finally:
        await conn.close()


async def test_fences_after_a_standby_promotion_are_above_every_fence_before(
    tmp_path: Path,
) -> None:
    primary = PostgresServer(run_dir=tmp_path / "pg-primary")
    primary.start()
    standby = PostgresStandby(primary, run_dir=tmp_path / "pg-standby")
    locks = PartitionLocks(multi_host_dsn(primary, standby), "r1", connect_timeout_s=3)
    successor = PartitionLocks(multi_host_dsn(primary, standby), "r2", connect_timeout_s=3)
    try:
        standby.start()
        await locks.connect()
        timeline = locks.timeline  # what signalman_postgres_timeline exports (StoreFailover)
        assert timeline >= 1
        issued = [await locks.acquire_partition("ev", 0) for _ in range(3)]
        # Wait until the standby has replayed them, then cut it off: paused, WAL sender ended.
        deadline = time.monotonic() + 10
        while await _max_fence(standby.port, "ev") < issued[-1]:
            assert time.monotonic() < deadline, "standby never caught up"
            await asyncio.sleep(0.05)
        replicated = list(issued)
        standby.pause()
        admin = await asyncpg.connect(primary.dsn)
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        await admin.close()
        issued += [await locks.acquire_partition("ev", 0) for _ in range(3)]
        primary.kill()
        standby.resume()
        await asyncio.to_thread(standby.promote)
        assert await asyncio.to_thread(standby.is_primary)
        # The forced case: the promoted standby lacks the acknowledged bumps.
        assert await _max_fence(standby.port, "ev") == max(replicated) < max(issued)

        await successor.connect()  # the multi-host DSN finds the promoted standby
        assert successor.timeline == timeline + 1
        after = [await successor.acquire_partition("ev", 0) for _ in range(2)]
        assert min(after) > max(issued), (issued, after)
        assert len(set(after) | set(issued)) == len(after) + len(issued)
        assert min(after) > TIMELINE_SPAN  # a new timeline: fences in its own range
    finally:
        await locks.close()
        await successor.close()
        for server in (standby, primary):
            server.stop()
            remove_run_dir(server)
