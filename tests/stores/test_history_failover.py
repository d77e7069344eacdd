"""Signalman's history across a real Sentinel failover to a replica that lacked the last appends
(forced: the replica is paused and cut off while they are made, then the primary is killed and
the paused replica promoted). A resuming subscriber gets an explicit gap, never an offset of the
old epoch reused for a different event; appends wait for a replica (``WAIT``) and count the ones
no replica acknowledged instead of stalling."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api_realtime.server import SignalmanApp
from pkg.clients.signalman import Gap, SignalmanClient
from pkg.common.auth import parse_tokens
from pkg.devstack.servers import RedisHA, RedisServer, redis_command
from pkg.events.sink import Event
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from signalman.history import SourcePos
from signalman.history.redis import RedisHistory
from tests.signalman.conftest import TOKENS, embedded_config, event_json


async def _publish_retrying(client: SignalmanClient, *events: str, timeout: float = 20.0) -> None:
    """Publish once the platform reaches the promoted primary (the first calls after the
    failover may meet connections to the dead one)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.publish(list(events))
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_subscriber_resuming_across_a_failover_gets_a_gap_never_a_reused_offset(
    redis_ha_factory: Callable[..., RedisHA],
) -> None:
    ha = redis_ha_factory()
    prefix = f"sm{uuid.uuid4().hex[:6]}"
    app = SignalmanApp(
        # A replica's acknowledgement can take more than the default 100 ms on a CI machine
        # whose other test worker runs a drill (seen once: the first appends counted lagging).
        embedded_config(redis_url=ha.spec, redis_prefix=prefix, history_wait_ms=1_000),
        tokens=parse_tokens(TOKENS),
    )
    await app.start()
    client = SignalmanClient(f"127.0.0.1:{app.port}", token="tpa")
    reader = SignalmanClient(f"127.0.0.1:{app.port}", token="ta")
    history = app.history
    assert isinstance(history, RedisHistory)
    try:
        await client.publish([event_json("acme", seq=i) for i in range(3)])
        before = await history.info("acme")
        assert before.head_offset == 3 and before.epoch
        # Behind Sentinel every append waits for a replica: these were acknowledged.
        assert history.replication.wanted == 1
        assert history.replication.acknowledged >= 1 and history.replication.unreplicated == 0

        old_primary = ha.primary_port()
        assert old_primary is not None
        replica = next(s for s in ha.servers if s.port != old_primary)
        replica.pause()
        redis_command(old_primary, "CLIENT", "KILL", "TYPE", "replica")
        # Acknowledged by the primary only: each WAIT times out, is counted, and the append
        # returns (the events are in the history and delivered; only their durability is short).
        for seq in (3, 4):
            await client.publish([event_json("acme", seq=seq)])
        lost = await history.read_after("acme", 3, 10)
        assert [e.offset for e in lost] == [4, 5]
        assert history.replication.unreplicated >= 2
        assert history.replication.unreplicated_events == 2
        assert history.replication.as_dict()["status"] == "lagging"

        ha.server(old_primary).kill()
        replica.resume()
        new_primary = await asyncio.to_thread(ha.wait_primary_change, old_primary)
        assert new_primary == replica.port
        raw = aioredis.Redis(port=new_primary, decode_responses=True)
        try:  # the forced case: the promoted replica really lacks offsets 4 and 5
            assert await raw.get(f"{prefix}:t:{{acme}}:seq") == "3"
        finally:
            await raw.aclose()

        await _publish_retrying(client, event_json("acme", seq=100), event_json("acme", seq=101))
        after = await history.info("acme")
        assert after.epoch != before.epoch  # the history says it may have lost entries
        # The new events took offsets 4 and 5 again, but in the new epoch only.
        fresh = await history.read_after("acme", 3, 10)
        assert [(e.offset, e.epoch) for e in fresh] == [(4, after.epoch), (5, after.epoch)]

        # A subscriber that saw offset 5 of the old epoch (seq 4) resumes: it is told the
        # history does not reach back, then gets the new epoch's events, never "offset 4 or 5"
        # of the old epoch carrying seq 100/101.
        resume = {"streams": (before.epoch, 5)}
        async with reader.subscribe(["streams"], resume_from=resume) as sub:
            gap = await sub.get(10)
            assert isinstance(gap, Gap), gap
            assert gap.epoch == after.epoch and "epoch" in gap.reason
            got = [await sub.get(10) for _ in range(2)]
            assert all(isinstance(e, pb.Event) and e.epoch == after.epoch for e in got), got
            assert [json.loads(e.data_json)["seq"] for e in got if isinstance(e, pb.Event)] == [
                100,
                101,
            ]
        # The promoted replica has no replica of its own (the old primary is dead): appends
        # after the failover are counted as unreplicated, and still go through.
        assert history.replication.unreplicated_events >= 4
    finally:
        await reader.close()
        await client.close()
        await app.stop()


async def test_appends_without_a_replica_keep_flowing_and_are_counted(
    redis_ha_factory: Callable[..., RedisHA],
) -> None:
    """With every replica gone, WAIT cannot be satisfied: appends still succeed (while lagging
    they wait ``LAGGING_WAIT_MS``, with one full wait per ``PROBE_EVERY_S``), each is counted
    as unreplicated, and once a replica is back they are acknowledged again."""
    ha = redis_ha_factory()
    history = RedisHistory(ha.spec, prefix=f"sm{uuid.uuid4().hex[:6]}", wait_timeout_ms=1_000)

    async def append(offset: int) -> None:
        event = Event("stream.started", "acme", {"n": offset})
        result = await history.append("acme", [("streams", event)], SourcePos("ev", 0, offset), 1)
        assert result.status == "appended"

    try:
        await append(0)
        assert history.replication.acknowledged == 1
        replica = next(s for s in ha.servers if s.port != ha.primary_port())
        replica.pause()
        try:
            for offset in range(1, 21):
                await append(offset)
            assert history.replication.unreplicated == 20
            assert history.replication.unreplicated_events == 20
            assert history.replication.as_dict()["status"] == "lagging"
        finally:
            replica.resume()
        deadline = asyncio.get_running_loop().time() + 20
        offset = 21
        while history.replication.lagging:
            assert asyncio.get_running_loop().time() < deadline, history.replication
            await append(offset)
            offset += 1
            await asyncio.sleep(0.05)
        assert history.replication.acknowledged >= 2
        assert history.replication.as_dict()["status"] == "ok"
        assert len(await history.read_after("acme", 0, 1000)) == offset  # 0 .. offset - 1
    finally:
        await history.close()


async def test_an_append_to_a_frozen_primary_fails_in_bounded_time_instead_of_waiting(
    tmp_path: Path,
) -> None:
    """Without Sentinel's +switch-master to end it, a command waiting on a SIGSTOPped server
    times out (and its connection reconnects): the consumer retries the batch instead of
    hanging on the frozen primary."""
    server = RedisServer(run_dir=tmp_path / "redis")
    server.start()
    history = RedisHistory(server.url, prefix="frozen", op_timeout_s=0.5)
    event = Event("stream.started", "acme", {"n": 0})
    try:
        await history.append("acme", [("streams", event)], SourcePos("ev", 0, 0), 1)
        server.pause()
        try:
            with pytest.raises(RedisError):
                await asyncio.wait_for(
                    history.append("acme", [("streams", event)], SourcePos("ev", 0, 1), 1), 30
                )
        finally:
            server.resume()
        result = await history.append("acme", [("streams", event)], SourcePos("ev", 0, 2), 1)
        assert result.status == "appended"
    finally:
        await history.close()
        server.stop()
        server.cleanup()
