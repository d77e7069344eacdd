"""Commands sent straight through held connections (``redisconn.HeldConnection``,
``redisconn.BatchedCalls``) on a real redis-server: replies in order, an error reply belongs to
its command only, a caller cancelled before its command was sent leaves no trace, and a
restarted server is reconnected."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from pkg.common import redisconn
from pkg.devstack.servers import RedisServer

pytestmark = pytest.mark.integration


async def test_concurrent_calls_share_round_trips_and_each_gets_its_own_reply(redis_server):
    client = redisconn.connect(redis_server.url, socket_timeout=5.0)
    key = f"held:{secrets.token_hex(4)}"
    calls = redisconn.BatchedCalls(client)
    try:
        replies = await asyncio.gather(*[calls.call("INCR", key) for _ in range(300)])
        assert sorted(replies) == list(range(1, 301))  # every command ran exactly once
        bad = calls.call("LPUSH", key, "x")  # wrong type: an error reply for this one only
        good = calls.call("GET", key)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(results[0], ResponseError) and results[1] == b"300"
    finally:
        await client.aclose()


async def test_a_caller_cancelled_before_its_command_was_sent_takes_it_back(redis_server):
    client = redisconn.connect(redis_server.url, socket_timeout=5.0)
    key = f"held:{secrets.token_hex(4)}"
    calls = redisconn.BatchedCalls(client, lanes=1)
    try:
        # The only lane is busy with a blocking command; the INCR waits behind it, unsent.
        busy = asyncio.ensure_future(calls.call("BLPOP", f"{key}:nothing", "0.3"))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(calls.call("INCR", key))
        await asyncio.sleep(0.05)
        waiting.cancel()
        assert await busy is None
        assert await calls.call("GET", key) is None  # the cancelled INCR never ran
    finally:
        await client.aclose()


async def test_a_restarted_server_is_reconnected_and_a_lost_script_reloaded(tmp_path):
    server = RedisServer(run_dir=tmp_path / "redis")
    server.start()
    # The client's own calls (the script load) retry once on a dropped socket, as Bridge's do.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    client = redisconn.connect(server.url, socket_timeout=5.0, retry=retry)
    plain = redisconn.connect(server.url, socket_timeout=5.0)  # no retry at all
    try:
        calls = redisconn.BatchedCalls(client)
        plain_calls = redisconn.BatchedCalls(plain, lanes=1)
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        assert await calls.evalsha(script, ["k"], []) == 1
        await plain_calls.call("PING")
        server.restart()  # drops the held connections, empties the script cache and the data
        # Checked before use as the pool checks what it hands out: reconnected, no retry needed.
        assert await plain_calls.call("SET", "p", "1")
        assert await calls.evalsha(script, ["k"], []) == 1
    finally:
        await client.aclose()
        await plain.aclose()
        server.stop()


async def test_commands_trickling_in_within_the_linger_share_round_trips(redis_server):
    client = redisconn.connect(redis_server.url, socket_timeout=5.0)
    key = f"held:{secrets.token_hex(4)}"
    calls = redisconn.BatchedCalls(client, linger_s=0.02)
    batches: list[int] = []
    for lane in calls._idle:
        execute = lane.execute

        async def counted(commands: list[Any], execute: Any = execute) -> list[Any]:
            batches.append(len(commands))
            return await execute(commands)

        lane.execute = counted  # type: ignore[method-assign]
    try:
        assert await calls.call("INCR", key) == 1  # a lone command: sent at once, alone
        assert batches == [1]

        async def one(i: int) -> Any:
            await asyncio.sleep(0.002 * i)  # one command every 2 ms, each its own caller
            return await calls.call("INCR", key)

        replies = await asyncio.gather(*(one(i) for i in range(20)))
        assert sorted(replies) == list(range(2, 22))  # every command ran exactly once
        assert len(batches) - 1 < 20, f"each command of the trickle went alone: {batches}"
    finally:
        await client.aclose()
