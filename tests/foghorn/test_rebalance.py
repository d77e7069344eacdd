"""The rebalancing plan (pure): who hands how many nodes to whom for an even split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api_balancing.rebalance import balanced, plan


def test_a_replica_that_joined_empty_gets_half_a_batch_at_a_time() -> None:
    assert plan("a", {"a": 20, "b": 0}, batch=4) == {"b": 4}
    assert plan("a", {"a": 12, "b": 8}, batch=4) == {"b": 2}
    assert plan("b", {"a": 20, "b": 0}, batch=4) == {}  # the one below its share gives nothing


def test_an_even_or_off_by_one_split_moves_nothing() -> None:
    assert plan("a", {"a": 10, "b": 10}, batch=5) == {}
    assert plan("a", {"a": 11, "b": 10}, batch=5) == {}
    assert plan("a", {"a": 11, "b": 10, "c": 10}, batch=5) == {}


def test_the_least_loaded_peers_are_filled_first_and_never_past_their_share() -> None:
    assert plan("a", {"a": 7, "b": 7, "c": 0}, batch=10) == {"c": 2}
    assert plan("a", {"a": 9, "b": 0, "c": 3}, batch=10) == {"b": 4, "c": 1}


def test_a_single_replica_or_an_unknown_one_moves_nothing() -> None:
    assert plan("a", {"a": 10}, batch=5) == {}
    assert plan("x", {"a": 10, "b": 0}, batch=5) == {}


@given(
    st.dictionaries(st.sampled_from("abcde"), st.integers(0, 200), min_size=2),
    st.integers(1, 50),
)
def test_replicas_following_the_plan_round_after_round_end_balanced(
    owned: dict[str, int], batch: int
) -> None:
    counts = dict(owned)
    for _ in range(1000):
        moved = False
        for me in sorted(counts):
            for peer, n in plan(me, counts, batch).items():
                assert 0 < n <= batch and peer != me
                counts[me] -= n
                counts[peer] += n
                moved = True
        if not moved:
            break
    assert balanced(counts) and sum(counts.values()) == sum(owned.values())
