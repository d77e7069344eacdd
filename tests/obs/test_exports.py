"""Every expression of the dashboard and the rules parses and names metrics the services export.

The platform of tests/obs/conftest.py runs with its Prometheus scraping every process; the names
Prometheus holds (``/api/v1/label/__name__/values``) are what the services really export, plus
the recording rules' own series. Expressions are parsed by ``promtool check rules`` (each one as a
recording rule). A few counters exist only once their first event happened (OpenTelemetry
instruments of ``pkg.clients``: retries, budget refusals, breaker moves); they are listed below
and each must be defined in the code under that name.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import yaml

from api_gateway.devtoken import mint
from devtools import alerts, dashboard, up
from pkg.devstack import install

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
# Series Prometheus makes itself.
BUILTIN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Families that appear on a process's /metrics only after their first event: (name as exported,
# the instrument name the code creates, where).
ON_FIRST_EVENT = {
    "client_retry_budget_exhausted_total": ("client_retry_budget_exhausted", "pkg/clients"),
}
_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and",
    "or", "unless", "le", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\boffset\s+-?(?:\d+(?:ms|s|m|h|d|w|y))+", " ", text)  # offsets
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _NOT_METRICS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def rule_expressions() -> list[str]:
    exprs = []
    for name in ("alerts.yml", "rules.yml"):
        doc = yaml.safe_load((RULES / name).read_text())
        exprs += [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]
    return exprs


def dashboard_expressions() -> list[str]:
    doc = json.loads((ROOT / "deploy" / "grafana" / "platform.json").read_text())
    return dashboard.expressions(doc)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def test_metric_names_are_found_in_expressions() -> None:
    expr = (
        'sum by (job) (rate(bridge_http_responses_total{status=~"5.."}[5m])) '
        "/ on (job) histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket[1m]))) > 0.5 "
        "or job:foo:sum unless ALERTS or last_over_time(y_total[15m] offset 1h2m)"
    )
    assert metric_names(expr) == {
        "bridge_http_responses_total",
        "x_seconds_bucket",
        "job:foo:sum",
        "ALERTS",
        "y_total",
    }


def test_the_committed_dashboard_is_the_generated_one() -> None:
    committed = (ROOT / "deploy" / "grafana" / "platform.json").read_text()
    assert committed == dashboard.render(), "run: .venv/bin/python -m devtools.dashboard"


def test_every_dashboard_and_rule_expression_parses(tmp_path: Path) -> None:
    exprs = dashboard_expressions() + rule_expressions()
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "exprs.yml"
    path.write_text(json.dumps(rules))
    result = subprocess.run(
        [str(install.promtool_binary()), "check", "rules", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _traffic(stack: up.Stack) -> None:
    """Viewer queries through every Bridge replica: Bridge's and its clients' counters appear
    on their first request."""
    jwt = mint(up.BRIDGE_JWT_SECRET, "exports", ["viewer"], "platform", "bridge", 600)
    query = '{ route(contentId: "exports", latitude: 48.85, longitude: 2.35) { best { nodeId } } }'
    for url in stack.endpoints["bridge graphql"]:
        for _ in range(3):
            reply = httpx.post(url, json={"query": query}, timeout=10,
                               headers={"authorization": f"Bearer {jwt}"})  # fmt: skip
            assert reply.status_code == 200, reply.text


def test_every_expression_names_metrics_the_running_services_export(
    platform: tuple[up.Stack, Path],
) -> None:
    stack, _ = platform
    url = stack.prometheus_url
    assert url, "the platform has no Prometheus"
    _traffic(stack)
    recorded = {
        str(r["record"])
        for g in yaml.safe_load((RULES / "rules.yml").read_text())["groups"]
        for r in g["rules"]
    }
    for exported, (instrument, where) in ON_FIRST_EVENT.items():
        source = "\n".join(p.read_text() for p in (ROOT / where).rglob("*.py"))
        assert f'"{instrument}"' in source, f"{exported} is not defined in {where}"
    # Until Prometheus has scraped every process since the traffic (bounded).
    deadline = time.monotonic() + 60
    while True:
        names = set(_get(f"{url}/api/v1/label/__name__/values")["data"])
        known = names | recorded | BUILTIN | set(ON_FIRST_EVENT)
        unknown = {
            (name, expr)
            for expr in dashboard_expressions() + rule_expressions()
            for name in metric_names(expr)
            if name not in known
        }
        if not unknown or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not unknown, "expressions naming metrics nobody exports:\n" + "\n".join(
        f"  {name}: {expr}" for name, expr in sorted(unknown)
    )


def test_no_alert_fires_on_the_quiet_platform(platform: tuple[up.Stack, Path]) -> None:
    stack, _ = platform
    assert stack.prometheus_url
    firing = alerts.firing(stack.prometheus_url, timeout=5)
    assert firing == [], [a.describe() for a in firing or []]
