"""The one health report: its status follows critical dependencies and a stop in progress."""

from __future__ import annotations

from pkg.common.health import Dependency, HealthReport, Status


def test_the_status_is_the_worst_critical_dependency_with_its_reason() -> None:
    report = HealthReport.of(
        "svc",
        "r1",
        [
            Dependency("store", "redis", Status.DEGRADED, "redis unreachable"),
            Dependency("events", "kafka", Status.DEGRADED, "kafka down", critical=False),
        ],
        {"nodes": 3},
        {"ha": {"leader": True}},
    )
    assert report.status is Status.DEGRADED and report.http_status == 200
    assert report.reasons == ("store: redis unreachable",)
    doc = report.to_json()
    assert doc["status"] == "degraded" and doc["ha"] == {"leader": True}
    assert doc["dependencies"]["events"] == {
        "kind": "kafka", "status": "degraded", "reason": "kafka down"
    }  # fmt: skip
    assert doc["figures"] == {"nodes": 3}


def test_a_stopping_replica_is_not_serving_from_the_first_moment() -> None:
    report = HealthReport.of("svc", "r1", [Dependency("store", "memory")], stopping=True)
    assert report.status is Status.NOT_SERVING and report.http_status == 503
    assert report.reasons[0] == "stopping"


def test_a_dependency_the_service_cannot_serve_without_makes_it_not_serving() -> None:
    deps = [Dependency("history", "redis", Status.NOT_SERVING, "down")]
    assert not HealthReport.of("svc", "r1", deps).serving
