"""A Foghorn replica cut from Redis while its peers still reach it (a partition, not an outage)
hands its node streams to them; in an outage it keeps them (``api_balancing.ha.partition``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from api_balancing.ha.partition import PartitionHandover, PeerAnswer
from api_balancing.sessions import SessionRegistry
from pkg.clients.foghorn import FoghornClient
from tests.foghorn.conftest import NodeStream, register_msg, report_msg
from tests.foghorn_ha.blackhole import Blackhole
from tests.foghorn_ha.conftest import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    async def asleep(self, seconds: float) -> None:
        self.now += seconds


class FakeSession:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.closed = False
        self.sent: list[Any] = []

    def hand_over(self, message: Any) -> bool:
        if self.closed:
            return False
        self.closed = True
        self.sent.append(message)
        return True


class FakeSessions:
    def __init__(self, *node_ids: str) -> None:
        self.sessions = [FakeSession(n) for n in node_ids]

    def open_sessions(self) -> list[FakeSession]:
        return [s for s in self.sessions if not s.closed]


def handover(
    healthy: list[bool], sessions: FakeSessions, answers: list[PeerAnswer], clock: FakeClock
) -> tuple[PartitionHandover, list[list[str]]]:
    asked: list[list[str]] = []

    async def ask(addresses: list[str]) -> list[PeerAnswer]:
        asked.append(addresses)
        return answers

    check = PartitionHandover(
        "a",
        lambda: healthy[0],
        lambda: {"a": "a:1", "b": "b:1", "c": "c:1"},
        sessions,  # type: ignore[arg-type]
        ask,
        after_s=5.0,
        clock=clock,  # type: ignore[arg-type]
    )
    return check, asked


async def test_cut_replica_hands_its_streams_to_the_least_loaded_peer_reaching_redis() -> None:
    clock, sessions = FakeClock(), FakeSessions("n1", "n2")
    answers = [
        PeerAnswer("b:1", True, "b", node_streams=9),
        PeerAnswer("c:1", True, "c", node_streams=2),
    ]
    healthy = [False]
    check, asked = handover(healthy, sessions, answers, clock)
    assert await check.round() == 0  # the cut starts now
    clock.now += 4.9
    assert await check.round() == 0 and asked == []  # not yet: a blip is not a partition
    clock.now += 0.2
    assert await check.round() == 2
    assert asked == [["b:1", "c:1"]]  # every peer but itself
    for session in sessions.sessions:
        [message] = session.sent
        assert list(message.reconnect.targets) == ["c:1", "b:1"]
    assert check.describe()["nodes_handed_over"] == 2


async def test_outage_seen_by_every_peer_keeps_the_streams() -> None:
    clock, sessions = FakeClock(), FakeSessions("n1")
    answers = [PeerAnswer("b:1", False, "b"), PeerAnswer("c:1", False, error="UNAVAILABLE")]
    check, asked = handover([False], sessions, answers, clock)
    await check.round()
    clock.now += 6
    assert await check.round() == 0
    assert asked and sessions.open_sessions() == sessions.sessions


async def test_redis_back_resets_the_cut() -> None:
    clock, sessions = FakeClock(), FakeSessions("n1")
    healthy = [False]
    check, asked = handover(healthy, sessions, [PeerAnswer("b:1", True, "b")], clock)
    await check.round()
    clock.now += 4
    healthy[0] = True
    await check.round()
    healthy[0] = False
    clock.now += 2
    await check.round()  # a new cut: its clock starts again
    clock.now += 2
    assert await check.round() == 0 and asked == []
    assert check.unreachable_s() == 2


async def test_no_handover_without_streams_or_peers() -> None:
    clock = FakeClock()
    check, asked = handover([False], FakeSessions(), [PeerAnswer("b:1", True)], clock)
    await check.round()
    clock.now += 10
    assert await check.round() == 0 and asked == []
    lonely = PartitionHandover(
        "a", lambda: False, lambda: {"a": "a:1"}, SessionRegistry(), check.ask, after_s=1.0,
        clock=clock,  # type: ignore[arg-type]
    )  # fmt: skip
    await lonely.round()
    clock.now += 2
    assert await lonely.round() == 0 and asked == []


# -- real replicas: a cut from Redis by a silent relay, b not --------------------------------------
@pytest.fixture
async def cuttable_redis(redis_server: Any) -> AsyncIterator[Blackhole]:
    hole = await Blackhole("127.0.0.1", redis_server.port).start()
    yield hole
    await hole.close()


@pytest.mark.integration
async def test_replica_cut_from_redis_moves_its_nodes_to_a_peer_and_rejoins_without_them(
    make_replica: Callable[..., Awaitable[Any]],
    clients: Callable[[Any], FoghornClient],
    cuttable_redis: Blackhole,
) -> None:
    a = await make_replica("a", url=cuttable_redis.url)
    b = await make_replica("b")
    stream = NodeStream(clients(a.grpc_target))
    await stream.register(register_msg("edge-1"))
    stream.report(report_msg(10.0))
    await eventually(lambda: (r := b.store.get("edge-1")) is not None and r.owner == "a")
    await eventually(lambda: len(a.ha.membership.replicas) == 2)
    fence_a = a.ha.ownership.fence_of("edge-1")

    cuttable_redis.blackhole()
    message = await stream.read(timeout=15.0)  # the store notices, then half the TTL (0.75 s)
    assert message.WhichOneof("msg") == "reconnect", message
    assert list(message.reconnect.targets) == [b.grpc_target]
    assert await stream.status() == grpc.StatusCode.OK  # a hand-over, not an error
    assert a.ha.ownership.owned() == []  # a claims nothing while cut
    assert a.ha.describe()["partition"]["nodes_handed_over"] == 1

    moved = NodeStream(clients(b.grpc_target))  # as pkg.clients' node does
    await moved.register(register_msg("edge-1"))
    moved.report(report_msg(20.0))
    await eventually(lambda: b.store.get("edge-1").owner == "b")
    fence_b = b.ha.ownership.fence_of("edge-1")
    assert fence_a is not None and fence_b is not None and fence_b > fence_a
    route = await clients(b.grpc_target).route_viewer("s1", lat=50.0, lon=8.0)
    assert route.best.node_id == "edge-1"

    cuttable_redis.heal()
    await eventually(lambda: a.health().to_json()["status"] == "ok", timeout=15.0)
    await eventually(lambda: (r := a.store.get("edge-1")) is not None and r.owner == "b")
    assert a.ha.ownership.owned() == []
    owner = await b.ha.ownership.lookup("edge-1")
    assert owner is not None and owner.replica == "b" and owner.fence == fence_b
    await moved.close()


@pytest.mark.integration
async def test_redis_cut_from_every_replica_is_an_outage_and_the_streams_stay(
    make_replica: Callable[..., Awaitable[Any]],
    clients: Callable[[Any], FoghornClient],
    cuttable_redis: Blackhole,
) -> None:
    a = await make_replica("a", url=cuttable_redis.url)
    b = await make_replica("b", url=cuttable_redis.url)
    stream = NodeStream(clients(a.grpc_target))
    await stream.register(register_msg("edge-1"))
    stream.report(report_msg(10.0))
    await eventually(lambda: (r := b.store.get("edge-1")) is not None and r.owner == "a")
    await eventually(lambda: len(a.ha.membership.replicas) == 2)

    cuttable_redis.blackhole()
    # a asked b (over the relay), b does not reach Redis either: an outage, nothing moves
    await eventually(lambda: a.ha.partition.rounds >= 2, timeout=20.0)
    assert [x.reachable for x in a.ha.partition.last_answers] == [False]
    assert a.ha.partition.nodes_handed == 0 and len(a.sessions.open_sessions()) == 1
    route = await clients(a.grpc_target).route_viewer("s1", lat=50.0, lon=8.0)
    assert route.best.node_id == "edge-1"  # routing from memory, with the node still here
    cuttable_redis.heal()
    await eventually(lambda: a.health().to_json()["status"] == "ok", timeout=15.0)
    stream.report(report_msg(20.0))  # its next write restores the lapsed owner record

    async def owned_by_a() -> bool:
        owner = await b.ha.ownership.lookup("edge-1")
        return owner is not None and owner.replica == "a"

    await eventually(owned_by_a)
    await stream.close()
