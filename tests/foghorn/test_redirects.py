"""Pending redirects: counted per node, settled by arrivals oldest first, expired after 30 s."""

from __future__ import annotations

from api_balancing.redirects import RedirectTracker
from pkg.common.clock import FakeClock


def test_redirects_count_until_the_viewers_show_up() -> None:
    clock = FakeClock()
    seen: dict[str, int] = {}
    tracker = RedirectTracker(clock)
    tracker.add_listener(seen.__setitem__)
    for _ in range(3):
        tracker.record("n1", "s1")
    assert tracker.pending("n1") == 3 and seen["n1"] == 3
    tracker.arrived("n1", "s1", 2)
    assert tracker.pending("n1") == 1
    tracker.arrived("n1", "other", 5)  # other streams do not settle these
    assert tracker.pending("n1") == 1


def test_redirects_expire_after_the_window() -> None:
    clock = FakeClock()
    tracker = RedirectTracker(clock, window_s=30)
    tracker.record("n1", "s1")
    clock.advance(20)
    tracker.record("n1", "s1")
    clock.advance(11)
    tracker.expire()
    assert tracker.pending("n1") == 1
    clock.advance(20)
    tracker.expire()
    assert tracker.pending("n1") == 0


def test_settled_redirects_are_not_expired_twice() -> None:
    clock = FakeClock()
    tracker = RedirectTracker(clock, window_s=30)
    tracker.record("n1", "s1")
    clock.advance(5)
    tracker.record("n1", "s1")
    tracker.arrived("n1", "s1", 1)  # settles the older one
    clock.advance(26)  # the older entry's time passes: nothing pending of that age
    tracker.expire()
    assert tracker.pending("n1") == 1
    clock.advance(5)
    tracker.expire()
    assert tracker.pending("n1") == 0


def test_forget_drops_everything_of_a_node() -> None:
    tracker = RedirectTracker(FakeClock())
    tracker.record("n1", "s1")
    tracker.record("n2", "s1")
    tracker.forget("n1")
    assert tracker.pending("n1") == 0 and tracker.pending("n2") == 1


def test_forget_touches_only_the_nodes_own_entries() -> None:
    clock = FakeClock()
    tracker = RedirectTracker(clock, window_s=30)
    for i in range(1000):
        tracker.record(f"other-{i}", f"s{i}")
    tracker.record("n1", "a")
    tracker.record("n1", "b")
    tracker.forget("n1")
    assert tracker.pending("n1") == 0 and tracker.pending("other-5") == 1
    tracker.record("n1", "a")  # a fresh entry after forgetting expires on its own
    clock.advance(31)
    tracker.expire()
    assert tracker.pending("n1") == 0 and tracker.pending("other-5") == 0


def test_a_client_accounts_for_at_most_its_cap_of_pending_redirects() -> None:
    clock = FakeClock()
    tracker = RedirectTracker(clock, window_s=30, per_client=4)
    counted = [tracker.record("n1", "s1", client="203.0.113.7") for _ in range(10)]
    assert counted == [True] * 4 + [False] * 6 and tracker.capped == 6
    assert tracker.pending("n1") == 4
    assert tracker.record("n1", "s1", client="198.51.100.1")  # another client: its own cap
    tracker.arrived("n1", "s1", 1)  # the oldest (the first client's) arrived: a slot frees up
    assert tracker.record("n1", "s1", client="203.0.113.7")
    assert tracker.pending("n1") == 5
