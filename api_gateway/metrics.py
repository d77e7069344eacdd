"""Bridge's hot-path counters on /metrics, read at scrape time (``pkg.common.metrics``).

A request used to make three OpenTelemetry instrument calls (response, rate-limit decision,
cache result): about a sixth of a kept answer's CPU. The code keeps plain counters instead and
this module exports them under the same names and labels (dashboards, rules and alerts
unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable

from api_gateway.http import RESPONSES
from bridge.answers import AnswerCache
from bridge.ratelimit import RateLimiter
from pkg.common.metrics import Metrics, Sample


def _responses(_: object) -> Iterable[Sample]:
    return [({"status": str(status), "code": code}, n) for (status, code), n in RESPONSES.items()]


def _decisions(limiter: RateLimiter) -> Iterable[Sample]:
    return [({"decision": d, "mode": m}, n) for (d, m), n in limiter.decisions.items()]


def _answers(answers: AnswerCache) -> Iterable[Sample]:
    return [({"result": result}, n) for result, n in answers.results.items()]


def register(registry: Metrics, limiter: RateLimiter, answers: AnswerCache) -> None:
    """Report one replica's limiter and answer cache (for as long as they live) and, once per
    registry, the process's HTTP responses."""
    if "bridge_http_responses_total" not in registry.names():
        registry.counter(
            "bridge_http_responses_total", "GraphQL HTTP responses by status and error code",
            _responses, ("status", "code"),
        )  # fmt: skip
    registry.counter(
        "bridge_ratelimit_decisions_total", "Rate-limit decisions by outcome and mode",
        _decisions, ("decision", "mode"), limiter,
    )  # fmt: skip
    registry.counter(
        "bridge_answer_cache_requests_total",
        "Kept-answer lookups of cacheable queries by result (hit, miss, early) and answers kept "
        "(stored)",
        _answers, ("result",), answers,
    )  # fmt: skip
