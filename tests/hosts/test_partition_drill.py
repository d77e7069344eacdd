"""Two partition drills end to end, as ``./dev drill A,B --short --hosts`` runs them.

A subprocess, like an operator's run: it creates the namespaces, starts the platform on its
hosts, cuts the leading Foghorn replica from Redis under traffic (it steps down and hands its
nodes to the other replica), heals, then cuts a Signalman
replica from the broker, heals, runs the history checker after each, writes the JSON and
removes every namespace. The finalizer removes the namespaces itself if the run was killed
half-way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import hosts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.failure,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI is root)"),
]

ROOT = Path(__file__).resolve().parents[2]
PLAN = hosts.HostPlan(prefix="hapd", subnet="10.213.9.0/24")


@pytest.fixture
def drill_env() -> Iterator[dict[str, str]]:
    env = dict(os.environ, DEV_HOSTS_PREFIX=PLAN.prefix, DEV_HOSTS_SUBNET=PLAN.subnet)
    env.pop("DEV_HOSTS_INSIDE", None)
    try:
        yield env
    finally:
        hosts.Hosts(PLAN).teardown()  # only matters when the run was killed
        assert hosts.leftovers(PLAN) == []


# A platform start (about 30 s on a quiet machine) and two drills of about 20 s each: 120 s, the
# suite's default, is too tight on a shared 2-core machine.
@pytest.mark.timeout(420)
def test_partitioned_replicas_are_routed_around_and_the_history_stays_clean(
    drill_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "drills.json"
    proc = subprocess.run(
        [sys.executable, "-m", "devtools", "drill",
         "partition-foghorn-redis,partition-signalman-kafka", "--short", "--hosts",
         "--json", str(out)],
        check=False, cwd=ROOT, env=drill_env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    drills = json.loads(out.read_text())["platforms"]["hosts"]["drills"]
    row = drills["partition-foghorn-redis"]
    why = json.dumps({k: row[k] for k in ("problems", "facts", "errors_sample")})[:4000]
    assert row["requests"] > 50 and row["failed_requests"] == 0, why
    assert [p["action"] for p in row["facts"]["partition"]] == ["cut", "heal"], why
    assert row["facts"]["checker"]["clean"] and row["facts"]["checker"]["records"] > 0, why
    assert row["detect_s"] is not None, why  # the victim said degraded
    assert row["facts"]["takeover"]["lease"]["moved"] == 1, why  # the other replica leads
    own = row["facts"]["takeover"]["ownership"]  # its nodes moved to the replica reaching Redis
    assert own["victim_held"] >= 1 and own["moved"] == own["victim_held"], why
    record = row["facts"]["record"]  # what .bench/drills.json keeps per partition drill
    assert record["healed_t_s"] > 0 and record["takeover_s"]["ownership"]["moved"] >= 1, why
    assert record["checker_clean"] and record["failed_routings"] == 0, why
    assert row["ok"], why
    sig = drills["partition-signalman-kafka"]
    why = json.dumps({k: sig[k] for k in ("problems", "facts")})[:4000]
    part = sig["facts"]["takeover"]["partition"]
    assert part["victim_held"] >= 1 and part["moved"] == part["victim_held"], why
    assert sig["lost_events"] == 0 and sig["duplicate_events"] == 0, why
    assert sig["facts"]["checker"]["clean"] and sig["ok"], why
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert hosts.leftovers(PLAN) == []
