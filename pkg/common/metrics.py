"""The one metrics registry of a process, exported in the Prometheus text format on /metrics.

Two kinds of metric feed it:

- OpenTelemetry instruments (``opentelemetry.metrics.get_meter(...)``) for rare events: the
  process's MeterProvider exports through this registry (``setup``).
- Scrape-time families for hot paths: the code keeps plain integers (or a ``Buckets``) and the
  app's wiring registers a reader with ``Metrics.counter/gauge/histogram``, so a routing decision
  or an event costs no instrument call. Sources are held weakly: a stopped fleet or processor
  drops out of /metrics by itself, and several replicas in one test process add up.

Every family is checked when it is defined, so /metrics stays ``promtool check metrics`` clean and
the catalogue (docs/metrics.md) stays true: snake_case names, counters end in ``_total``, base
units in the name (``_seconds``, ``_bytes``: never milliseconds), histograms are histograms (no
``le``/``quantile`` labels on counters or gauges), and label names are declared up front. Label
values are chosen by our code (replica ids, results, stages), never copied from a client's input;
a family that would grow past ``MAX_SERIES`` series keeps the first ones and logs once.
"""

from __future__ import annotations

import bisect
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = structlog.get_logger("pkg.common.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES = 1000

Kind = Literal["counter", "gauge", "histogram"]
Labels = Mapping[str, str]
# A counter or gauge reader yields (labels, value); a histogram reader yields
# (labels, buckets) with the bucket counts per bound (not cumulative, +Inf last) and the sum.
Sample = tuple[Labels, float]
HistogramSample = tuple[Labels, "Buckets"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
# Units that are not base units: the name must say seconds or bytes (Prometheus conventions).
_NON_BASE_UNITS = re.compile(
    r"_(milliseconds|millis|ms|microseconds|micros|us|nanoseconds|ns|minutes|hours|"
    r"kilobytes|kb|megabytes|mb|gigabytes|percent)(_|$)"
)
_RESERVED_LABELS = {"le", "quantile"}
_HISTOGRAM_UNITS = ("_seconds", "_bytes", "_ratio")


class MetricDefinitionError(ValueError):
    """A metric family breaks the naming rules; the message says which rule."""


def check_name(kind: Kind, name: str, labels: Sequence[str] = ()) -> None:
    """Raise ``MetricDefinitionError`` unless ``name`` and ``labels`` follow our conventions."""
    if not _NAME.match(name):
        raise MetricDefinitionError(f"{name!r}: metric names are snake_case [a-z0-9_]")
    if _NON_BASE_UNITS.search(name):
        raise MetricDefinitionError(f"{name!r}: use base units in names (seconds, bytes)")
    if kind == "counter" and not name.endswith("_total"):
        raise MetricDefinitionError(f"{name!r}: counter names end in _total")
    if kind != "counter" and name.endswith("_total"):
        raise MetricDefinitionError(f"{name!r}: only counters end in _total")
    if kind == "histogram" and not name.endswith(_HISTOGRAM_UNITS):
        raise MetricDefinitionError(
            f"{name!r}: histogram names end in their unit {_HISTOGRAM_UNITS}"
        )
    for label in labels:
        if not _LABEL.match(label):
            raise MetricDefinitionError(f"{name!r}: label {label!r} is not snake_case")
        if label in _RESERVED_LABELS:
            raise MetricDefinitionError(f"{name!r}: label {label!r} is reserved (use a histogram)")


class Buckets:
    """A histogram's state kept by hot-path code: ``observe`` is a bisect and two additions.

    Not thread-safe by design (each owner observes from its own event loop); a scrape reads a
    snapshot that may lag one observation, which Prometheus tolerates.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise MetricDefinitionError("histogram bounds must be increasing and non-empty")
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merged(self, other: Buckets) -> Buckets:
        if other.bounds != self.bounds:
            raise MetricDefinitionError("cannot merge histograms with different bounds")
        out = Buckets(self.bounds)
        out.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        out.sum = self.sum + other.sum
        return out


@dataclass
class _Family:
    kind: Kind
    name: str
    help: str
    labels: tuple[str, ...]
    # Weakly held sources, each with its reader; a family without sources is not exported.
    sources: list[tuple[weakref.ref[Any] | None, Callable[[Any], Iterable[Any]]]] = field(
        default_factory=list
    )
    warned: bool = False

    def samples(self) -> Iterator[Any]:
        alive = []
        for ref, read in self.sources:
            source = ref() if ref is not None else None
            if ref is not None and source is None:
                continue
            alive.append((ref, read))
            yield from read(source)
        self.sources[:] = alive


class Metrics:
    """A process's registry: OpenTelemetry's exporter plus the scrape-time families."""

    def __init__(self, service: str, process_collectors: bool = True) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()
        self.registry.register(self)

    # -- definitions ------------------------------------------------------------------------
    def counter(
        self, name: str, help: str, read: Callable[[Any], Iterable[Sample]],
        labels: Sequence[str] = (), source: object | None = None,
    ) -> None:  # fmt: skip
        """A monotonic count read at scrape time (``name`` ends in ``_total``)."""
        self._add("counter", name, help, labels, read, source)

    def gauge(
        self, name: str, help: str, read: Callable[[Any], Iterable[Sample]],
        labels: Sequence[str] = (), source: object | None = None,
    ) -> None:  # fmt: skip
        """A current value read at scrape time."""
        self._add("gauge", name, help, labels, read, source)

    def histogram(
        self, name: str, help: str, read: Callable[[Any], Iterable[HistogramSample]],
        labels: Sequence[str] = (), source: object | None = None,
    ) -> None:  # fmt: skip
        """A distribution kept in ``Buckets`` by its owner, exported as a Prometheus histogram."""
        self._add("histogram", name, help, labels, read, source)

    def _add(
        self, kind: Kind, name: str, help: str, labels: Sequence[str],
        read: Callable[[Any], Iterable[Any]], source: object | None,
    ) -> None:  # fmt: skip
        check_name(kind, name, labels)
        ref = weakref.ref(source) if source is not None else None
        with self._lock:
            family = self._families.get(name)
            if family is None:
                family = self._families[name] = _Family(kind, name, help, tuple(labels))
            elif (family.kind, family.labels) != (kind, tuple(labels)):
                raise MetricDefinitionError(f"{name!r} is already defined differently")
            family.sources.append((ref, read))

    # -- export -----------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: one family per defined name."""
        with self._lock:
            families = list(self._families.values())
        for family in families:
            metric = self._export(family)
            if metric is not None:
                yield metric

    def _export(self, family: _Family) -> Metric | None:
        names = list(family.labels)
        if family.kind == "histogram":
            merged: dict[tuple[str, ...], Buckets] = {}
            for labels, buckets in family.samples():
                key = self._key(family, labels)
                if key in merged:
                    merged[key] = merged[key].merged(buckets)
                elif self._room(family, len(merged)):
                    merged[key] = buckets
            if not family.sources:
                return None
            hist = HistogramMetricFamily(family.name, family.help, labels=names)
            for key, b in merged.items():
                running, rows = 0, []
                for bound, count in zip((*b.bounds, float("inf")), b.counts, strict=True):
                    running += count
                    rows.append((_bound_text(bound), running))
                hist.add_metric(list(key), rows, b.sum)
            return hist
        values: dict[tuple[str, ...], float] = {}
        for labels, value in family.samples():
            key = self._key(family, labels)
            if key in values:
                values[key] += float(value)
            elif self._room(family, len(values)):
                values[key] = float(value)
        if not family.sources:
            return None
        metric: CounterMetricFamily | GaugeMetricFamily
        if family.kind == "counter":
            # prometheus_client appends _total itself to the sample name.
            metric = CounterMetricFamily(family.name[: -len("_total")], family.help, labels=names)
        else:
            metric = GaugeMetricFamily(family.name, family.help, labels=names)
        for key, value in values.items():
            metric.add_metric(list(key), value)
        return metric

    @staticmethod
    def _room(family: _Family, series: int) -> bool:
        """Whether another series fits; past ``MAX_SERIES`` the rest is dropped, logged once."""
        if series < MAX_SERIES:
            return True
        if not family.warned:
            family.warned = True
            log.error("metric_series_capped", metric=family.name, max_series=MAX_SERIES)
        return False

    def _key(self, family: _Family, labels: Labels) -> tuple[str, ...]:
        if set(labels) != set(family.labels):
            raise MetricDefinitionError(
                f"{family.name}: got labels {sorted(labels)}, declared {list(family.labels)}"
            )
        return tuple(str(labels[n])[:128] for n in family.labels)

    def text(self) -> bytes:
        """Every metric of this process in the Prometheus text format."""
        return generate_latest(self.registry)

    def names(self) -> list[str]:
        """The scrape-time families defined so far (for the catalogue test)."""
        with self._lock:
            return sorted(self._families)


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


_lock = threading.Lock()
_process: Metrics | None = None


def setup(service: str) -> Metrics:
    """The process's registry, created once (later calls return the first one), with the
    OpenTelemetry MeterProvider installed to export through it."""
    global _process
    with _lock:
        if _process is None:
            _process = Metrics(service)
            _install_opentelemetry(_process)
        return _process


def process_metrics() -> Metrics:
    """The process's registry (a service process calls ``setup`` first; tests and tools that
    did not get one, so their families have somewhere to go)."""
    return _process if _process is not None else setup("unnamed")


def _install_opentelemetry(target: Metrics) -> None:
    from opentelemetry import metrics as otel
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    # No otel_scope_* labels: they repeat the metric's prefix on every series.
    reader = PrometheusMetricReader(registry=target.registry, scope_info_enabled=False)
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": target.service})
    )
    otel.set_meter_provider(provider)


def per_source(
    labels: Callable[[Any], Labels], value: Callable[[Any], float]
) -> Callable[[Any], Iterable[Sample]]:
    """A reader for one source that yields one sample: ``labels(src)`` -> ``value(src)``."""

    def read(source: Any) -> Iterable[Sample]:
        return [(labels(source), value(source))]

    return read
