"""The local platform's rules clock and how a drill judges its alerts (pure functions)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from devtools import drills
from pkg.devstack.servers import scaled_rules

RULE = """
      - alert: X
        expr: sum(rate(a_total[5m])) > 0 and min_over_time(b[1m]) > 0
        for: 2m
      - alert: Y
        expr: increase(c_total[10m]) > 5
        for: 30s
      - alert: Z
        expr: d_total > last_over_time(d_total[15m] offset 2m)
"""


def test_scaled_rules_shorten_every_hold_and_window_but_keep_a_few_scrapes() -> None:
    scaled = scaled_rules(RULE, 1 / 20, min_window_s=5.0)
    assert "rate(a_total[15000ms])" in scaled  # 5 m / 20
    assert "min_over_time(b[5000ms])" in scaled  # 1 m / 20 = 3 s, kept at 5 s
    assert "increase(c_total[30000ms])" in scaled
    assert "for: 6000ms" in scaled  # 2 m / 20
    assert "for: 1500ms" in scaled  # 30 s / 20
    assert "last_over_time(d_total[45000ms] offset 6000ms)" in scaled  # offsets too
    assert "> 5" in scaled and "> 0" in scaled  # thresholds untouched


def test_scaled_rules_at_scale_one_change_only_the_notation() -> None:
    assert "for: 120000ms" in scaled_rules(RULE, 1.0, min_window_s=5.0)


def _judge(
    alerts: tuple[str, ...], fired: list[str], resolved: list[str], url: Any = "x"
) -> list[str]:
    platform: Any = SimpleNamespace(stack=SimpleNamespace(prometheus_url=url))
    drill: Any = SimpleNamespace(alerts=alerts)
    result = drills.Result("d", "e", alerts_fired=fired, alerts_resolved=resolved)
    return drills._alert_problems(platform, drill, result)


def test_a_drill_is_not_ok_when_its_expected_alert_did_not_fire_or_did_not_resolve() -> None:
    assert _judge(("A", "B"), ["A", "B", "C"], ["A", "B"]) == []
    assert _judge(("A", "B"), ["A"], ["A"]) == ["expected alerts did not fire: B"]
    assert _judge(("A",), ["A"], []) == ["alerts still firing after recovery: A"]
    assert _judge((), [], []) == []
    assert _judge(("A",), [], [], url=None) == [
        "no Prometheus on this platform: expected alerts cannot be checked"
    ]
