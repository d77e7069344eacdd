"""The scaling RFC's Phase 1, 2 and 3 procedures, out and back, with real processes (the
``rollout`` drill, short): an operator's node mode survives every step in both directions, no
viewer routing fails, straight to Foghorn or through Bridge, callers and subscribers move
between replicas by their watched list alone (no restart), and once events go through Kafka
every subscriber receives each of them once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.drill_rollout import RolloutPlatform, run_rollout

pytestmark = [pytest.mark.integration, pytest.mark.failure]


NODES = 4


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[RolloutPlatform]:
    """The drill stops its processes itself; this also does when the test is interrupted (a
    pytest-timeout left the whole platform running)."""
    p = RolloutPlatform(tmp_path, NODES)
    yield p
    p.stop()


def test_rollout_and_rollback_keep_the_operators_mode_fail_no_routing_and_lose_no_event(
    platform: RolloutPlatform, tmp_path: Path
) -> None:
    facts = asyncio.run(run_rollout(NODES, tmp_path, platform))
    assert "error" not in facts, facts
    steps = facts["steps"]
    assert [s["step"].split()[0] for s in steps][:2] == ["P1.2", "P1.3"], steps
    assert len(steps) == 21, steps
    assert [s["step"].split()[0] for s in steps if s["step"].startswith("P3")] == [
        "P3.1", "P3.2", "P3.3", "P3.4", "P3.5", "P3", "P3", "P3", "P3",
    ], steps  # fmt: skip
    # Kept at every step: every Foghorn replica holding the node had the mode set on the first.
    assert facts["state_kept"] is True and all(s["state_kept"] for s in steps), steps
    assert facts["requests"] > 200, facts  # traffic really flowed through every step
    assert facts["failed_foghorn"] == 0 and facts["failed_bridge"] == 0, steps
    # Callers followed their watched list (no restart) to every replica later retired, and had
    # left it before its SIGTERM.
    retired = facts["routings_before_retired"]
    assert sorted(retired) == ["foghorn-h1", "foghorn-h2", "foghorn-m"], facts
    assert all(count > 0 for count in retired.values()), facts
    # Phase 3: events went through Kafka, and every subscriber received each one produced from
    # then on (to the end, across the rollback) exactly once.
    since = facts["since_phase3"]
    assert facts["phase3_on"] and since["events"] > 50, facts
    assert since["lost"] == 0 and since["duplicated"] == 0, (since, facts["subscribers"])
    # They moved by their list: E -> K1/K2 -> E2, told of each change of history.
    for sub in facts["subscribers"].values():
        assert len(set(sub["replicas"])) >= 3 and sub["gaps"] == 2 and not sub["ended_with"], sub
