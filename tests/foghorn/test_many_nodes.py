"""A fleet registering all at once over one client channel (one HTTP/2 connection)."""

from __future__ import annotations

import asyncio

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
