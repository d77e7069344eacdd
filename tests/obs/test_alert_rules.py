"""The alert and recording rules: they parse, every alert is complete and unit-tested.

``promtool check rules`` and ``promtool test rules`` (Debian's prometheus package, installed by
./dev) run on deploy/prometheus; the checks below hold what promtool cannot: each alert has a
severity, a summary and a runbook page that exists, and a unit test that fires it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from pkg.devstack import install

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
SEVERITIES = {"critical", "warning", "info"}
# What issue 15 asks an operator to be told about, at least.
REQUIRED = {
    "ReplicaDown", "HAStoreUnreachable", "SyncLagHigh", "FencingRejections", "LeaderMissing",
    "BreakerOpen", "RetryBudgetExhausted", "Bridge5xxRatio", "RateLimitSaturation",
    "ConsumerLagHigh", "DeadLetterGrowth", "EventSinkBuffering", "EventSinkDropping",
    "SubscriberDrops",
}  # fmt: skip


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(install.promtool_binary()), *args],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_its_promtool_unit_test() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_summary_and_an_existing_runbook() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        runbook = annotations.get("runbook_url", "")
        assert runbook.startswith("docs/runbooks/"), (name, runbook)
        assert (ROOT / runbook).is_file(), (name, runbook)


def test_the_alerts_operators_need_exist_and_each_has_a_unit_test() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED, sorted(REQUIRED - names)
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names <= fired, f"alerts no unit test fires: {sorted(names - fired)}"
