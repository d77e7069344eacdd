"""How Foghorn ranks nodes: the reference scoring, pure and explainable.

Score of an eligible node (higher is better; each part is bounded by its weight)::

    cpu          = w_cpu * (1 - cpu_percent / 100)
    ram          = w_ram * (1 - ram_used / ram_max)
    bandwidth    = w_bw  * (1 - (upload + pending_redirect_bps) / bandwidth_limit)
    geo          = w_geo * (1 - great_circle_km / HALF_EARTH_CIRCUMFERENCE_KM)   (0 if unknown)
    stream_bonus = w_bonus when the node already carries the content

Pending redirects (viewers sent to the node in the last 30 s that have not shown up in its
reports yet) count as bandwidth already taken, so a burst of viewers does not all land on the
node that looked best a moment ago. Ties are broken by node id (ascending), so the ranking is
deterministic. ``index.FleetIndex`` computes the same numbers vectorised for the hot path; this
module is the specification it is tested against and what ``ExplainRoute`` shows.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from api_balancing.model import GeoPoint, NodeMode, NodeRecord

EARTH_RADIUS_KM = 6371.0088
HALF_EARTH_CIRCUMFERENCE_KM = math.pi * EARTH_RADIUS_KM


@dataclass(frozen=True)
class Weights:
    """Score weights (defaults follow the upstream balancer)."""

    cpu: float = 500.0
    ram: float = 500.0
    bandwidth: float = 1000.0
    geo: float = 1000.0
    stream_bonus: float = 50.0

    def describe(self) -> str:
        return (
            f"cpu={self.cpu:g} ram={self.ram:g} bandwidth={self.bandwidth:g} "
            f"geo={self.geo:g} stream_bonus={self.stream_bonus:g}"
        )


class Rejection(enum.IntEnum):
    """Why a node cannot take a request; values match ``foghorn.v1.Rejection``."""

    NONE = 0
    MAINTENANCE = 1
    DRAINING = 2
    STALE = 3
    NO_CAPABILITY = 4
    NO_BANDWIDTH = 5
    CAPACITY_ZERO = 6
    DISCONNECTED = 7


@dataclass(frozen=True)
class RouteQuery:
    """What is being routed and when.

    ``role`` is the node role needed ("edge" for viewers, "ingest" for publishers);
    ``protocol`` (optional) must be among the node's capabilities; ``now`` is wall time.
    """

    content_id: str
    location: GeoPoint | None
    now: float
    stale_after_s: float
    role: str = "edge"
    protocol: str = ""


@dataclass(frozen=True)
class ScoreParts:
    cpu: float = 0.0
    ram: float = 0.0
    bandwidth: float = 0.0
    geo: float = 0.0
    stream_bonus: float = 0.0
    redirect_penalty_bps: float = 0.0

    @property
    def total(self) -> float:
        return self.cpu + self.ram + self.bandwidth + self.geo + self.stream_bonus


@dataclass(frozen=True)
class Evaluation:
    """One node judged for one query: eligible with a score, or rejected with a reason."""

    node_id: str
    rejection: Rejection
    reason: str
    score: float
    parts: ScoreParts
    distance_km: float  # -1 when either location is unknown

    @property
    def eligible(self) -> bool:
        return self.rejection is Rejection.NONE


def great_circle_km(a: GeoPoint, b: GeoPoint) -> float:
    """Great-circle distance (haversine) in km."""
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat = lat2 - lat1
    dlon = math.radians(b.longitude) - math.radians(a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def load_parts(cpu_percent: float, ram_used: int, ram_max: int, w: Weights) -> tuple[float, float]:
    """The CPU and RAM parts, which depend only on the node's last report."""
    ram_ratio = ram_used / ram_max if ram_max > 0 else 1.0
    return w.cpu * (1.0 - cpu_percent / 100.0), w.ram * (1.0 - ram_ratio)


def geo_part(distance_km: float, w: Weights) -> float:
    if distance_km < 0:
        return 0.0
    return w.geo * (1.0 - distance_km / HALF_EARTH_CIRCUMFERENCE_KM)


def _rejected(node_id: str, rejection: Rejection, reason: str) -> Evaluation:
    return Evaluation(node_id, rejection, reason, 0.0, ScoreParts(), -1.0)


def evaluate(
    record: NodeRecord,
    query: RouteQuery,
    weights: Weights,
    pending_redirects: int = 0,
    redirect_bps: float = 0.0,
) -> Evaluation:
    """Judge one node for one query (the reference implementation of routing)."""
    ident = record.identity
    node_id = ident.node_id
    if not record.connected:
        return _rejected(node_id, Rejection.DISCONNECTED, "disconnected: control stream is gone")
    if record.mode is NodeMode.MAINTENANCE:
        return _rejected(node_id, Rejection.MAINTENANCE, _mode_reason("maintenance", record))
    if record.mode is NodeMode.DRAINING:
        return _rejected(node_id, Rejection.DRAINING, _mode_reason("draining", record))
    report = record.report
    if report is None:
        return _rejected(node_id, Rejection.STALE, "stale: no load report yet")
    age = query.now - record.last_report_at
    if age > query.stale_after_s:
        return _rejected(
            node_id,
            Rejection.STALE,
            f"stale: last report {age:.1f} s ago (limit {query.stale_after_s:g} s)",
        )
    if query.role not in ident.roles:
        return _rejected(
            node_id, Rejection.NO_CAPABILITY, f"no capability: lacks role {query.role!r}"
        )
    if query.protocol and query.protocol not in ident.capabilities:
        return _rejected(
            node_id, Rejection.NO_CAPABILITY, f"no capability: lacks protocol {query.protocol!r}"
        )
    if ident.capacity <= 0 or report.bandwidth_limit_bps <= 0:
        what = "capacity" if ident.capacity <= 0 else "bandwidth_limit_bps"
        return _rejected(node_id, Rejection.CAPACITY_ZERO, f"capacity zero: {what} is 0")
    penalty_bps = pending_redirects * redirect_bps
    used = report.upload_bps + penalty_bps
    if used >= report.bandwidth_limit_bps:
        return _rejected(
            node_id,
            Rejection.NO_BANDWIDTH,
            f"no bandwidth: upload {report.upload_bps} + pending {penalty_bps:.0f} bps "
            f">= limit {report.bandwidth_limit_bps}",
        )
    viewers = sum(s.viewers for s in report.streams) + pending_redirects
    if viewers >= ident.capacity:
        return _rejected(
            node_id,
            Rejection.NO_BANDWIDTH,
            f"no bandwidth: {viewers} viewers (incl. pending) >= capacity {ident.capacity}",
        )
    cpu, ram = load_parts(report.cpu_percent, report.ram_used_bytes, report.ram_max_bytes, weights)
    bandwidth = weights.bandwidth * (1.0 - used / report.bandwidth_limit_bps)
    distance = -1.0
    if query.location is not None and ident.location is not None:
        distance = great_circle_km(query.location, ident.location)
    geo = geo_part(distance, weights)
    carries = query.content_id != "" and any(
        s.stream_id == query.content_id for s in report.streams
    )
    bonus = weights.stream_bonus if carries else 0.0
    parts = ScoreParts(cpu, ram, bandwidth, geo, bonus, penalty_bps)
    return Evaluation(node_id, Rejection.NONE, "", parts.total, parts, distance)


def rank(evaluations: Iterable[Evaluation]) -> list[Evaluation]:
    """Eligible nodes best first; ties broken by node id."""
    eligible = [e for e in evaluations if e.eligible]
    eligible.sort(key=lambda e: (-e.score, e.node_id))
    return eligible


def _mode_reason(mode: str, record: NodeRecord) -> str:
    return f"{mode}: set by operator" + (f" ({record.mode_reason})" if record.mode_reason else "")
