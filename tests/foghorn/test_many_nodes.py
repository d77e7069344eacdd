"""A fleet registering all at once: over one client channel (one HTTP/2 connection), and on a
replica whose loop is too busy to read the Registers in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from api_balancing.handlers import NodeControlService
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import Harness, NodeStream, register_msg


async def test_3000_nodes_register_at_once_over_one_channel(foghorn: Harness) -> None:
    # Every stream is opened before the server has accepted the first: grpc core queues them
    # until the application asks for the next call. Its default backlog (1,000 soft, 3,000
    # hard) cancelled hundreds of these, which the client saw as INTERNAL "Internal error
    # from Core" on its first write.
    streams = [NodeStream(foghorn.ops) for _ in range(3000)]
    foghorn.streams.extend(streams)
    for i, stream in enumerate(streams):
        stream.send(pb.NodeMessage(register=register_msg(f"herd-{i:04d}")))
    replies = await asyncio.gather(*(s.read(timeout=60.0) for s in streams))
    assert all(r.WhichOneof("msg") == "registered" for r in replies)
    assert len(foghorn.server.store.snapshot()) == 3000


async def test_a_register_delayed_by_a_busy_loop_is_not_taken_for_a_silent_node(
    make_foghorn: Callable[..., Awaitable[Harness]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A herd keeps the replica's loop busy for longer than the register timeout: the Register
    # of a node that opened its stream meanwhile is queued behind thousands of others, not
    # missing. Here the loop is blocked past the timeout, and the Register's handling then
    # waits its turn (0.2 s) as it would behind the herd's work.
    handle = NodeControlService._handle

    async def queued(self: NodeControlService, msg: pb.NodeMessage, *args: Any) -> Any:
        if msg.WhichOneof("msg") == "register":
            await asyncio.sleep(0.2)
        return await handle(self, msg, *args)

    monkeypatch.setattr(NodeControlService, "_handle", queued)
    foghorn = await make_foghorn(register_timeout_s=0.3)
    stream = NodeStream(foghorn.ops)
    foghorn.streams.append(stream)
    await asyncio.sleep(0.1)  # the server's handler is waiting for the Register
    stream.send(pb.NodeMessage(register=register_msg("late-1")))
    time.sleep(1.0)
    reply = await stream.read()
    assert reply.WhichOneof("msg") == "registered"
    # A stream that stays silent is still closed once the loop keeps time.
    silent = NodeStream(foghorn.ops)
    foghorn.streams.append(silent)
    assert await silent.status() == grpc.StatusCode.DEADLINE_EXCEEDED
