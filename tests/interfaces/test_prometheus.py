"""Every process's /metrics passes ``promtool check metrics`` (Debian's prometheus 2.42) and
follows the catalogue's rules: histograms are histograms, names carry base units."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys

import httpx
import pytest

from pkg.clients.signalman import SignalmanClient
from pkg.common.metrics import Buckets, MetricDefinitionError, Metrics, check_name
from pkg.devstack import install
from pkg.events.sink import Event
from tests.bridge.fakes import token
from tests.bridge.stack import edge_nodes
from tests.interfaces.conftest import OPERATOR_TOKEN, Platform

pytestmark = pytest.mark.integration


async def _traffic(platform: Platform) -> None:
    """Enough traffic that every hot-path family has samples: a node reporting, routing through
    Bridge (client latency), events published and delivered (event age at every stage)."""
    async with (
        edge_nodes(platform.foghorn_grpc, ["metrics-node-1"]),
        httpx.AsyncClient(timeout=10) as http,
    ):
        for _ in range(20):
            reply = await http.post(
                platform.graphql_url,
                json={"query": '{ route(contentId: "live-1") { considered } }'},
                headers={"Authorization": f"Bearer {token('acme')}"},
            )
            if reply.json().get("data"):
                break
            await asyncio.sleep(0.2)
    sub = SignalmanClient([f"127.0.0.1:{platform.signalman_grpc}"], token="sig-acme")
    pub = SignalmanClient([f"127.0.0.1:{platform.signalman_grpc}"], token="pub-acme")
    try:
        async with sub.subscribe(["all"]) as stream:
            await stream.wait_subscribed()
            events = [
                json.dumps(dataclasses.asdict(Event("stream.started", "acme", {"n": i})))
                for i in range(40)
            ]
            await pub.publish(events)
            for _ in range(40):  # one event in 16 has its age observed: 40 give some
                await stream.get(10)
    finally:
        await sub.close()
        await pub.close()


async def test_every_process_metrics_pass_promtool_with_histograms_in_base_units(
    platform: Platform,
) -> None:
    await _traffic(platform)
    promtool = install.promtool_binary()
    pages = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for name, url in platform.metrics_urls().items():
            # Foghorn's and Signalman's /metrics are for operators (docs/security.md).
            reply = await http.get(url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            assert reply.status_code == 200
            pages[name] = reply.text
    for name, text in pages.items():
        check = subprocess.run(
            [str(promtool), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        assert not [n for n in types if re.search(r"_(milliseconds|ms|bucket_total)\b", n)]
        assert "quantile=" not in text
    assert pages["foghorn"].count("# TYPE foghorn_routing_decision_seconds histogram") == 1
    assert "# TYPE client_call_duration_seconds histogram" in pages["bridge"]
    assert 'client_call_duration_seconds_bucket{le="+Inf"' in pages["bridge"]
    assert "# TYPE signalman_event_age_seconds histogram" in pages["signalman"]
    delivered = r'signalman_event_age_seconds_count\{stage="delivered"\} [1-9]'
    assert re.search(delivered, pages["signalman"])


def test_metric_names_follow_the_conventions() -> None:
    check_name("counter", "bridge_http_responses_total", ["status", "code"])
    check_name("histogram", "foghorn_routing_decision_seconds", ["replica"])
    for kind, name, labels in (
        ("counter", "bridge_http_responses", []),  # counters end in _total
        ("gauge", "queue_total", []),  # only counters do
        ("histogram", "signalman_event_age_milliseconds", []),  # base units
        ("histogram", "batch_size", []),  # histograms name their unit
        ("gauge", "routing_time_seconds", ["quantile"]),  # a quantile gauge is a histogram
        ("gauge", "BadName", []),
    ):
        with pytest.raises(MetricDefinitionError):
            check_name(kind, name, labels)  # type: ignore[arg-type]


def test_scrape_time_families_follow_their_sources_and_add_up() -> None:
    registry = Metrics("unit", process_collectors=False)

    class Source:
        def __init__(self, n: int) -> None:
            self.n = n
            self.latency = Buckets((0.1, 1.0))

    def count(s: Source) -> list[tuple[dict[str, str], float]]:
        return [({"replica": "r"}, s.n)]

    a, b = Source(2), Source(3)
    for s in (a, b):
        registry.counter("things_total", "things", count, ("replica",), s)
        registry.histogram("thing_seconds", "t", lambda s: [({}, s.latency)], (), s)
    a.latency.observe(0.05)
    b.latency.observe(0.5)
    text = registry.text().decode()
    assert 'things_total{replica="r"} 5.0' in text
    assert 'thing_seconds_bucket{le="0.1"} 1.0' in text and "thing_seconds_count 2.0" in text
    del s, b  # a stopped source drops out of /metrics by itself
    assert 'things_total{replica="r"} 2.0' in registry.text().decode()
    with pytest.raises(MetricDefinitionError):
        registry.gauge("things_total", "redefined as a gauge", count, ("replica",), a)


async def test_ha_processes_metrics_pass_promtool(
    redis_server,
    kafka_broker,
    postgres_server,
    process_factory,  # type: ignore[no-untyped-def]
) -> None:
    """The HA-only families (Foghorn's sync and lease, Signalman's group and lag) too."""
    from pkg.devstack.servers import free_port
    from tests.interfaces.conftest import TOKENS

    fog_http, sig_http = free_port(), free_port()
    fog_grpc, sig_grpc = free_port(), free_port()
    prefix = f"promtool-{fog_grpc}"
    process_factory(
        "foghorn-ha",
        [sys.executable, "-m", "api_balancing", "--grpc-port", str(fog_grpc),
         "--http-port", str(fog_http), "--replica-id", "fog-ha"],
        env={"PLATFORM_TOKENS": TOKENS, "FOGHORN_REDIS_URL": redis_server.url,
             "FOGHORN_CLUSTER": prefix},
        port=fog_grpc,
    )  # fmt: skip
    process_factory(
        "signalman-ha",
        [sys.executable, "-m", "api_realtime", "--grpc-port", str(sig_grpc),
         "--http-port", str(sig_http), "--replica-id", "sig-ha"],
        env={"PLATFORM_TOKENS": TOKENS, "SIGNALMAN_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
             "SIGNALMAN_TOPIC": f"{prefix}-events", "SIGNALMAN_GROUP_ID": f"{prefix}-group",
             "SIGNALMAN_REDIS_URL": redis_server.url, "SIGNALMAN_REDIS_PREFIX": prefix,
             "SIGNALMAN_POSTGRES_DSN": postgres_server.dsn},
        port=sig_grpc,
    )  # fmt: skip
    promtool = install.promtool_binary()
    async with httpx.AsyncClient(timeout=10) as http:
        for name, port, family in (
            ("foghorn", fog_http, "foghorn_ha_in_sync"),
            ("signalman", sig_http, "signalman_singleton_leader"),
        ):
            text = ""
            for _ in range(100):  # until the HA runtime has reported once
                text = (
                    await http.get(
                        f"http://127.0.0.1:{port}/metrics",
                        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},  # operators only
                    )
                ).text
                if f"# TYPE {family} " in text:
                    break
                await asyncio.sleep(0.2)
            assert f"# TYPE {family} " in text, name
            check = subprocess.run(
                [str(promtool), "check", "metrics"], input=text, capture_output=True,
                text=True, check=False,
            )  # fmt: skip
            assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"


def test_a_family_past_the_series_cap_keeps_the_first_series() -> None:
    from pkg.common import metrics

    registry = Metrics("unit", process_collectors=False)
    many = [({"replica": f"r{i}"}, 1.0) for i in range(metrics.MAX_SERIES + 50)]
    registry.gauge("wide", "too many series", lambda _: many, ("replica",))
    text = registry.text().decode()
    assert text.count("wide{") == metrics.MAX_SERIES and 'replica="r0"' in text
