"""Rebalancing never sends nodes to a peer that looks dead (pure logic, fake store/sessions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api_balancing.ha.membership import Membership
from pkg.common.clock import FakeClock
from tests.foghorn_ha.conftest import make_record


@dataclass
class FakeStore:
    records: list[Any] = field(default_factory=list)
    redis: Any = None

    def snapshot(self) -> list[Any]:
        return self.records

    def healthy(self) -> bool:
        return True


@dataclass
class FakeSession:
    node_id: str
    asked: list[Any] = field(default_factory=list)

    def hand_over(self, message: Any) -> bool:
        self.asked.append(message)
        return True


@dataclass
class FakeSessions:
    sessions: list[FakeSession]

    def open_sessions(self) -> list[FakeSession]:
        return self.sessions


def _membership(nodes_here: int) -> tuple[Membership, FakeClock, FakeSessions]:
    store = FakeStore([make_record(f"n{i}", owner="b") for i in range(nodes_here)])
    sessions = FakeSessions([FakeSession(f"n{i}") for i in range(nodes_here)])
    clock = FakeClock()
    m = Membership(
        store,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "b",
        sessions,  # type: ignore[arg-type]
        lambda _node: True,
        hold_s=3.0,
        clock=clock,
    )
    m.replicas = {"a": "x:1", "b": "x:2"}
    return m, clock, sessions


def test_an_empty_live_peer_gets_its_share() -> None:
    m, _clock, _sessions = _membership(12)
    assert m.rebalance_once() == 6


def test_a_peer_whose_nodes_arrived_here_unreleased_gets_none_until_the_hold_ends() -> None:
    # This replica's view never showed the peer owning anything (it lagged), so its count did
    # not "fall": only the unreleased records tell that the peer died.
    m, clock, _sessions = _membership(12)
    m.suspect("a")
    assert m.rebalance_once() == 0
    clock.advance(2.9)
    assert m.rebalance_once() == 0
    clock.advance(0.2)  # past the hold: the claim would have expired by now if a were dead
    assert m.rebalance_once() == 6


def test_this_replica_is_never_suspect_of_itself() -> None:
    m, _clock, _sessions = _membership(12)
    m.suspect("b")
    assert m.rebalance_once() == 6
