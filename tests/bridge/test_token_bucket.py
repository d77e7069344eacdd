"""The token-bucket maths (shared by the local limiter and mirrored by the Redis Lua script)."""

from __future__ import annotations

import pytest

from bridge.token_bucket import Limit, take


def test_a_full_bucket_admits_its_capacity_then_rejects():
    limit = Limit(capacity=3, rate=1.0)
    state = None
    allowed = []
    for _ in range(4):
        state, d = take(state, 0, limit)
        allowed.append(d.allowed)
    assert allowed == [True, True, True, False]
    assert d.remaining == 0
    assert d.retry_after_s == 1
    assert d.reset_s == 3


def test_tokens_refill_at_the_rate_and_never_beyond_capacity():
    limit = Limit(capacity=2, rate=2.0)
    state, _ = take(None, 0, limit)
    state, _ = take(state, 0, limit)
    state, d = take(state, 0, limit)
    assert not d.allowed
    state, d = take(state, 500, limit)  # 0.5 s at 2/s = one token
    assert d.allowed and d.remaining == 0
    state, d = take(state, 60_000, limit)
    assert d.allowed and d.remaining == 1  # capped at 2, minus the one taken


def test_remaining_counts_down_for_the_headers():
    limit = Limit(capacity=5, rate=1.0)
    state = None
    seen = []
    for _ in range(5):
        state, d = take(state, 0, limit)
        seen.append(d.remaining)
    assert seen == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("capacity,rate", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_limits_are_refused(capacity, rate):
    with pytest.raises(ValueError):
        Limit(capacity=capacity, rate=rate)
