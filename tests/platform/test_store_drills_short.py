"""The store failover drills in short mode, on a platform started with ``--ha-stores`` (Redis:
primary, two replicas, three Sentinels; PostgreSQL: primary and streaming standby).

One stack for the module; the Redis drills run first (each leaves the old primary back as a
replica), the PostgreSQL one last (it leaves the promoted standby without a standby of its
own, see docs/runbooks/postgres-failover.md). Each test asserts the drill's measured outcome,
not just its verdict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from devtools import drills

# A platform with the HA stores starts in ~30 s on a quiet machine; each drill takes ~30-60 s.
pytestmark = [pytest.mark.integration, pytest.mark.failure, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[drills.Platform]:
    platform = drills.Platform(
        drills.Settings.short(), tmp_path_factory.mktemp("store-drills"), ha_stores=True
    )
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


def _common_redis_outcome(result: drills.Result) -> None:
    facts = result.facts
    assert result.requests > 50 and result.events_produced > 20, explain(result)
    assert result.failed_requests == 0, explain(result)
    assert result.lost_events == 0, explain(result)
    assert facts["new_primary"] != facts["old_primary"], explain(result)
    assert facts["epoch_after"] > facts["epoch_before"], explain(result)
    assert facts["fences_seen"] > 0 and facts["tokens_seen_twice"] == [], explain(result)
    assert facts["old_primary_role_after"] == "slave", explain(result)
    ok_after = facts["foghorn_ok_after_promotion_s"]
    assert ok_after is not None and ok_after <= 10, explain(result)


def test_redis_primary_killed_sentinel_promotes_and_no_token_repeats(
    platform: drills.Platform,
) -> None:
    result = run(platform, "redis-failover")
    _common_redis_outcome(result)
    assert result.ok, explain(result)


def test_redis_zombie_primary_writes_after_the_promotion_are_never_seen(
    platform: drills.Platform,
) -> None:
    result = run(platform, "redis-zombie-primary")
    _common_redis_outcome(result)
    facts = result.facts
    # The zombie was written to after the promotion (refused, or accepted and then discarded by
    # its resync as a replica): either way nobody reads it.
    assert "zombie_write_reply" in facts, explain(result)
    assert facts["zombie_probe_on_new_primary"] == ":0", explain(result)
    assert facts["zombie_probe_on_old_primary"] == ":0", explain(result)
    assert result.ok, explain(result)


def test_postgres_primary_killed_standby_promoted_signalman_resumes_with_higher_fences(
    platform: drills.Platform,
) -> None:
    result = run(platform, "postgres-failover")
    facts = result.facts
    assert result.events_produced > 20, explain(result)
    assert result.lost_events == 0 and result.duplicate_events == 0, explain(result)
    before, after = facts["fences_before"], facts["fences_after"]
    assert before and all(after[k] > v for k, v in before.items()), explain(result)
    resumed = facts["signalman_resumed_after_promotion_s"]
    assert resumed is not None and resumed <= 15, explain(result)
    assert result.ok, explain(result)
