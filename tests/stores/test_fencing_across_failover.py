"""Fencing tokens, lease epochs and ownership fences survive a Sentinel failover to a replica
that lacked the last acknowledged increments (forced: the replica is SIGSTOPped while they are
issued, then the primary is killed and the paused replica promoted)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from pkg.common import redisconn
from pkg.coord import FenceCounter, LeaderLease, Ownership
from pkg.coord.era import EPOCH_SPAN, token_epoch
from pkg.devstack.servers import RedisHA, redis_command


class Issued:
    """Every token handed out, by kind; a token seen twice is a failure of the test."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {"fence": [], "owner": [], "lease": []}

    def add(self, kind: str, token: int) -> None:
        assert token not in self.tokens[kind], f"{kind} token {token} issued twice"
        self.tokens[kind].append(token)


async def _issue_round(
    issued: Issued, counter: FenceCounter, owners: Ownership, lease_of: Callable[[str], LeaderLease]
) -> None:
    for _ in range(3):
        issued.add("fence", await counter.next())
    for replica in ("a", "b", "c"):
        got = await owners.acquire("node-1", replica, f"{replica}:1")
        assert got.ok and got.record is not None
        issued.add("owner", got.record.fence)
    for holder in ("x", "y"):
        lease = lease_of(holder)
        state = await lease.try_acquire()
        assert state is not None
        issued.add("lease", state.epoch)
        await lease.release()


async def _retry(fn: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_tokens_never_repeat_when_the_promoted_replica_lacked_the_last_increments(
    redis_ha_factory: Callable[..., RedisHA],
) -> None:
    ha = redis_ha_factory()
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    client = redisconn.connect(
        ha.spec, name="test", decode_responses=True, socket_timeout=1, socket_connect_timeout=1
    )
    counter = FenceCounter(client, f"{prefix}:tokens")
    owners = Ownership(client, prefix, ttl_ms=60_000)

    def lease_of(holder: str) -> LeaderLease:
        return LeaderLease(client, f"{prefix}:leader", holder, ttl_s=30, renew_every_s=10)

    issued = Issued()
    try:
        await _issue_round(issued, counter, owners, lease_of)
        old_primary = ha.primary_port()
        assert old_primary is not None
        replica = next(s for s in ha.servers if s.port != old_primary)
        # The replica stops receiving: it is paused and the primary drops its link (a network
        # cut), so everything issued now is acknowledged by the primary only and never sent.
        replica.pause()
        redis_command(old_primary, "CLIENT", "KILL", "TYPE", "replica")
        before_loss = {k: list(v) for k, v in issued.tokens.items()}
        await _issue_round(issued, counter, owners, lease_of)
        await _issue_round(issued, counter, owners, lease_of)
        highest = {k: max(v) for k, v in issued.tokens.items()}
        ha.server(old_primary).kill()
        replica.resume()
        new_primary = await asyncio.to_thread(ha.wait_primary_change, old_primary)
        assert new_primary == replica.port

        # The forced case: the promoted replica really lacks the acknowledged increments.
        raw = aioredis.Redis(port=new_primary, decode_responses=True)
        try:
            assert int(await raw.get(f"{prefix}:tokens") or 0) == max(before_loss["fence"])
            assert int(await raw.get(f"{prefix}:fence") or 0) == max(before_loss["owner"])
            assert int(await raw.get(f"{prefix}:leader:epoch") or 0) == max(before_loss["lease"])
        finally:
            await raw.aclose()

        after = Issued()
        await _retry(counter.next)  # the first call may meet the dead primary
        await _issue_round(after, counter, owners, lease_of)
        for kind, tokens in after.tokens.items():
            assert min(tokens) > highest[kind], f"{kind}: {tokens} not above {highest[kind]}"
            assert not set(tokens) & set(issued.tokens[kind])
            assert all(token_epoch(t) == ha.failover_epoch() >= 1 for t in tokens)
        stats = redisconn.stats(client)
        assert stats is not None and stats.failovers >= 1 and stats.epoch >= 1
    finally:
        await client.aclose()


async def test_plain_url_tokens_are_the_counter_itself(
    redis_ha_factory: Callable[..., RedisHA],
) -> None:
    """Without Sentinel (a plain URL) nothing registers an epoch: tokens stay 1, 2, 3 ..."""
    ha = redis_ha_factory()
    primary = ha.primary_port()
    client = redisconn.connect(f"redis://127.0.0.1:{primary}/1", decode_responses=True)
    try:
        counter = FenceCounter(client, "plain:fence")
        assert [await counter.next() for _ in range(3)] == [1, 2, 3]
    finally:
        await client.aclose()


async def test_a_record_left_by_another_primary_makes_the_connection_re_register(
    redis_ha_factory: Callable[..., RedisHA],
) -> None:
    """A fencing script that finds the epoch record of another primary (replicated from a
    dead one) refuses; the connection reconnects, registers, and the retry succeeds."""
    ha = redis_ha_factory()
    client = redisconn.connect(ha.spec, decode_responses=True, socket_timeout=1)
    try:
        counter = FenceCounter(client, "era:fence")
        first = await counter.next()
        await client.set(redisconn.ERA_KEY, "00" * 20 + "|0")  # somebody else's record
        try:
            await counter.next()
        except Exception as exc:  # the refusal surfaces as a connection error
            assert "failover epoch" in str(exc)
        second = await counter.next()
        assert second > first
        assert second < EPOCH_SPAN  # still epoch 0: no failover happened
        stats = redisconn.stats(client)
        assert stats is not None and stats.stale_epoch_refusals == 1
    finally:
        await client.aclose()
