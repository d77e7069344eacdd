"""A subscription given a changing replica list (``file:``, as ``dns:///``) follows it without a
restart, as the scaling RFC's Phase 3 moves subscribers from one Signalman to another: when the
replica it is on stops, it resumes on a replica the list names now, and receives every event
that replica's history holds (told of the gap between the two histories first)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from api_realtime.server import SignalmanApp
from pkg.clients.signalman import Gap, SignalmanClient
from pkg.common.auth import parse_tokens
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import TOKENS, embedded_config, event_json, wait_until


async def test_a_subscription_follows_its_replica_file_to_a_replica_added_later(
    tmp_path: Path,
) -> None:
    old = SignalmanApp(embedded_config(), tokens=parse_tokens(TOKENS))
    new = SignalmanApp(embedded_config(), tokens=parse_tokens(TOKENS))
    await old.start()
    await new.start()
    listing = tmp_path / "signalman.txt"
    listing.write_text(f"127.0.0.1:{old.port}\n")
    client = SignalmanClient(f"file:{listing}", token="ta")
    publisher_old = SignalmanClient(f"127.0.0.1:{old.port}", token="tpa")
    publisher_new = SignalmanClient(f"127.0.0.1:{new.port}", token="tpa")
    old_stopped = False
    try:
        async with client.subscribe(["streams"]) as sub:
            await sub.wait_subscribed(10)
            await publisher_old.publish([event_json("acme", seq=0)])
            first = await sub.get(5)
            assert isinstance(first, pb.Event) and json.loads(first.data_json)["seq"] == 0
            # Events move to the new replica (as Foghorn's do at Phase 3's step 3) before the
            # subscriber does: it must not lose them.
            await publisher_new.publish([event_json("acme", seq=i) for i in (1, 2)])
            await asyncio.sleep(0.05)  # a new modification time, whatever the clock's grain
            listing.write_text(f"127.0.0.1:{new.port}\n")
            await wait_until(lambda: client.replicas == [f"127.0.0.1:{new.port}"], timeout=10,
                             what="the client re-read its replica file")  # fmt: skip
            await old.stop()  # tells its subscribers to resume elsewhere
            old_stopped = True
            gap = await sub.get(10)
            assert isinstance(gap, Gap) and "epoch" in gap.reason, gap
            moved = [await sub.get(5) for _ in range(2)]
            assert [json.loads(e.data_json)["seq"] for e in moved if isinstance(e, pb.Event)] == [
                1, 2,
            ]  # fmt: skip
            assert sub.stats.replicas[-1] == f"127.0.0.1:{new.port}", sub.stats
            await publisher_new.publish([event_json("acme", seq=3)])
            live = await sub.get(5)
            assert isinstance(live, pb.Event) and json.loads(live.data_json)["seq"] == 3
    finally:
        for c in (client, publisher_old, publisher_new):
            await c.close()
        if not old_stopped:
            await old.stop()
        await new.stop()
