"""The supervisor's restart schedule: 1, 2, 4 ... 60 s, reset after a healthy stretch."""

from __future__ import annotations

import pytest

from devtools.supervisor import RestartPolicy


def test_restart_delays_double_up_to_the_cap() -> None:
    policy = RestartPolicy()
    delays = [policy.on_exit() for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_resets_only_after_staying_healthy_long_enough() -> None:
    policy = RestartPolicy(reset_after=30)
    for _ in range(4):
        policy.on_exit()
    policy.on_health(True, now=100.0)
    policy.on_health(True, now=129.0)
    assert policy.on_exit() == 16  # 29 s healthy is not enough
    policy.on_health(True, now=200.0)
    policy.on_health(False, now=215.0)  # a blip restarts the healthy stretch
    policy.on_health(True, now=220.0)
    policy.on_health(True, now=250.0)
    assert policy.on_exit() == 1


def test_invalid_restart_policy_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial=0)
    with pytest.raises(ValueError):
        RestartPolicy(initial=10, cap=5)
