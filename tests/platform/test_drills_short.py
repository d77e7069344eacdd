"""The failover drills in short mode, on the real platform (``./dev up``'s stack).

One stack (Redis, PostgreSQL, tansu, two replicas of Foghorn, Signalman and Bridge, an edge
fleet) is started for the module with short TTLs; each test runs one drill of
``devtools.drills`` against it (real SIGKILL / SIGSTOP / server restarts, by pid) and asserts
the drill's measured outcome, not just its verdict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from devtools import drills

pytestmark = [pytest.mark.integration, pytest.mark.failure]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[drills.Platform]:
    run_dir = tmp_path_factory.mktemp("drills")
    platform = drills.Platform(drills.Settings.short(), run_dir)
    try:
        yield platform
    finally:
        platform.close()


def run(platform: drills.Platform, name: str) -> drills.Result:
    [result] = asyncio.run(drills.run_suite([name], platform))
    return result


def explain(result: drills.Result) -> str:
    return (
        f"{result.name}: problems={result.problems} facts={result.facts} "
        f"errors={result.errors_sample}"
    )


def test_one_foghorn_replica_killed_fails_no_viewer_routing(platform: drills.Platform) -> None:
    result = run(platform, "foghorn-kill")
    assert result.requests > 50, explain(result)  # traffic really flowed
    assert result.failed_requests == 0, explain(result)
    assert result.detect_s is not None and result.recover_s is not None, explain(result)
    assert result.recover_s <= 10.0, explain(result)
    assert result.restored_s is not None, explain(result)  # restarted by the supervisor
    assert platform.item("foghorn-0").restarts >= 1
    assert result.ok, explain(result)


def test_signalman_replica_killed_loses_no_events(platform: drills.Platform) -> None:
    result = run(platform, "signalman-kill")
    assert result.events_produced > 50, explain(result)
    assert result.lost_events == 0, explain(result)
    assert result.duplicate_events == 0, explain(result)
    assert result.failed_requests == 0, explain(result)
    assert platform.item("signalman-0").restarts >= 1
    assert result.ok, explain(result)


def test_routing_continues_through_a_redis_restart(platform: drills.Platform) -> None:
    result = run(platform, "redis-restart")
    assert result.requests > 50, explain(result)
    assert result.failed_requests == 0, explain(result)
    assert result.detect_s is not None, explain(result)  # Foghorn said "degraded"
    assert result.restored_s is not None, explain(result)  # and re-converged by itself
    # Not asserted here: the drill's event-continuity part (result.ok). A subscriber that resumes
    # on a Signalman replica while Redis restarts is sometimes left without events and without a
    # gap (a Signalman bug, reported); ./dev drill redis-restart shows it as NOT ok.


def test_paused_replica_late_writes_are_rejected(platform: drills.Platform) -> None:
    result = run(platform, "pause")
    facts = result.facts
    assert facts.get("owned_by_victim_before") and facts.get("survivor_took_over"), explain(result)
    assert facts.get("zombie_stream_status") == "ABORTED", explain(result)
    assert facts["victim_fenced_after"] > facts["victim_fenced_before"], explain(result)
    assert facts.get("survivor_data_kept_on_victim"), explain(result)
    assert facts.get("survivor_data_kept_on_survivor"), explain(result)
    assert result.ok, explain(result)
