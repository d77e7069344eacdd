"""The hot path of routing: every node's routing inputs in numpy arrays, scored in one pass.

``FleetIndex`` is fed by store change notifications (local writes and, with HA, other
replicas' writes), so routing reads only local memory. It computes the score of
``scoring.evaluate`` (tests hold the two against each other) over the whole fleet at once.

Everything that does not depend on the viewer is kept ready per node as it changes: whether
the node can take a viewer at all (connected, normal mode, fresh report, bandwidth and seats
left after pending redirects) and its CPU + RAM + bandwidth score plus the full geo weight.
For each (role, protocol) asked for, a cached column holds that score for the nodes that
qualify and -inf for the others, patched in place when a node changes. A query is then a
handful of vector operations: one dot product of unit vectors for the great-circle angle,
arccos, ``base - (w_geo / pi) * angle``, the stream bonus for carriers, and a partial sort for
the top ``limit``. Few operations matter more than small arrays here: between gRPC calls the
CPU caches are cold and each numpy call costs several microseconds.

Distances from unit vectors (arccos of a dot product) equal the reference haversine to within
about a metre.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from api_balancing.model import NodeIdentity, NodeMode, NodeRecord, StreamLoad
from api_balancing.scoring import EARTH_RADIUS_KM, Weights, load_parts

_F = npt.NDArray[np.float64]
_NEG_INF = -math.inf
_SHRINK = 1.0 - 1e-14

# Static rejection codes, known from the record alone (time and query independent).
_OK, _DISCONNECTED, _MAINTENANCE, _DRAINING, _NO_REPORT, _CAPACITY_ZERO = range(6)


@dataclass(frozen=True)
class Ranked:
    """One routing result: node id, its score and distance (-1 when unknown)."""

    node_id: str
    score: float
    distance_km: float


@dataclass
class _View:
    """Base score of the nodes that have every bit of ``need`` (-inf for the rest)."""

    need: int
    score: _F
    count: int  # finite entries


@dataclass
class _Node:
    """Per-node scalars the index derives columns from."""

    status: int = _DISCONNECTED
    bits: int = 0
    load: float = 0.0  # cpu + ram parts
    up: float = 0.0
    limit: float = 0.0
    viewers: float = 0.0
    capacity: float = 0.0
    report_at: float = 0.0
    located: bool = False
    pending: int = 0
    fresh: bool = True
    identity: NodeIdentity | None = None  # the identity the columns were derived from


class FleetIndex:
    """Columnar copy of the fleet, updated per node, queried per viewer."""

    def __init__(
        self,
        weights: Weights,
        redirect_bps: float = 0.0,
        stale_after_s: float = 90.0,
        initial_capacity: int = 256,
    ) -> None:
        self.weights = weights
        self.redirect_bps = redirect_bps
        self.stale_after_s = stale_after_s
        self._slots: dict[str, int] = {}
        self._ids: list[str] = []
        self._nodes: list[_Node] = []
        self._free: list[int] = []
        self._bits: dict[str, int] = {}  # role / capability name -> bit
        self._carriers: dict[str, set[int]] = {}  # stream id -> slots carrying it
        self._tenants: dict[str, str] = {}  # stream id -> tenant, while some node carries it
        self._streams_of: dict[int, tuple[str, ...]] = {}
        self._views: dict[int, _View] = {}
        self._oldest_fresh = math.inf  # lower bound of report times among fresh nodes
        self._alloc(initial_capacity)

    # -- storage ---------------------------------------------------------------------------

    def _alloc(self, n: int) -> None:
        self._xyz = np.zeros((n, 3))  # unit vector of the node's location (0 when unknown)
        self._slope = np.zeros(n)  # w_geo / pi for located nodes: geo = w_geo - slope * angle
        self._base = np.full(n, _NEG_INF)  # cpu + ram + bandwidth + w_geo, or -inf
        self._report_at = np.full(n, math.inf)  # for the staleness sweep
        self._angle_buf = np.zeros(n)
        self._viewer = np.zeros(3)
        self._score_buf = np.zeros(n)
        self._capacity_slots = n

    def _grow(self) -> None:
        old = self._capacity_slots
        xyz, slope, base, report_at = self._xyz, self._slope, self._base, self._report_at
        self._alloc(old * 2)
        self._xyz[:old] = xyz
        self._slope[:old] = slope
        self._base[:old] = base
        self._report_at[:old] = report_at
        self._views.clear()  # rebuilt lazily at the new size

    def _bit(self, name: str) -> int:
        bit = self._bits.get(name)
        if bit is None:
            if len(self._bits) >= 62:
                return 1 << 62  # more distinct names than bits: share one overflow bit
            bit = 1 << len(self._bits)
            self._bits[name] = bit
        return bit

    def __len__(self) -> int:
        return len(self._slots)

    def _refresh(self, slot: int) -> None:
        """Recompute one node's base score and patch it into every cached view."""
        node = self._nodes[slot]
        used = node.up + node.pending * self.redirect_bps
        ok = (
            node.status == _OK
            and node.fresh
            and used < node.limit
            and node.viewers + node.pending < node.capacity
        )
        value = _NEG_INF
        if ok:
            value = node.load + self.weights.bandwidth * (1.0 - used / node.limit)
            if node.located:
                value += self.weights.geo
        self._base[slot] = value
        for view in self._views.values():
            old = float(view.score[slot])
            new = value if (node.bits & view.need) == view.need else _NEG_INF
            if old != new:
                view.count += int(new != _NEG_INF) - int(old != _NEG_INF)
                view.score[slot] = new

    def _view(self, need: int) -> _View:
        view = self._views.get(need)
        if view is None:
            qualifies = np.zeros(self._capacity_slots, dtype=bool)
            for slot, node in enumerate(self._nodes):
                qualifies[slot] = (node.bits & need) == need
            score = np.where(qualifies, self._base, _NEG_INF)
            view = _View(need, score, int(np.count_nonzero(score != _NEG_INF)))
            self._views[need] = view
        return view

    # -- updates ---------------------------------------------------------------------------

    def update(self, node_id: str, record: NodeRecord | None) -> None:
        """Apply a store change (``None``: the node was deleted)."""
        if record is None:
            self._remove(node_id)
            return
        slot = self._slots.get(node_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._ids[slot] = node_id
                self._nodes[slot] = _Node()
            else:
                slot = len(self._ids)
                if slot >= self._capacity_slots:
                    self._grow()
                self._ids.append(node_id)
                self._nodes.append(_Node())
            self._slots[node_id] = slot
        node = self._nodes[slot]
        ident, report = record.identity, record.report
        status = _OK
        if not record.connected:
            status = _DISCONNECTED
        elif record.mode is NodeMode.MAINTENANCE:
            status = _MAINTENANCE
        elif record.mode is NodeMode.DRAINING:
            status = _DRAINING
        elif report is None:
            status = _NO_REPORT
        elif ident.capacity <= 0 or report.bandwidth_limit_bps <= 0:
            status = _CAPACITY_ZERO
        node.status = status
        if node.identity is not ident:  # identity-derived columns change only on register
            node.identity = ident
            bits = 0
            for name in ident.roles:
                bits |= self._bit("role:" + name)
            for name in ident.capabilities:
                bits |= self._bit("cap:" + name)
            node.bits = bits
            node.capacity = ident.capacity
            loc = ident.location
            node.located = loc is not None
            if loc is not None:
                lat, lon = math.radians(loc.latitude), math.radians(loc.longitude)
                self._xyz[slot] = (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon),
                                   math.sin(lat))  # fmt: skip
                self._slope[slot] = self.weights.geo / math.pi
            else:
                self._xyz[slot] = (0.0, 0.0, 0.0)
                self._slope[slot] = 0.0
        streams: tuple[str, ...] = ()
        loads: tuple[StreamLoad, ...] = ()
        if report is not None:
            cpu, ram = load_parts(
                report.cpu_percent, report.ram_used_bytes, report.ram_max_bytes, self.weights
            )
            node.load = cpu + ram
            node.up = report.upload_bps
            node.limit = report.bandwidth_limit_bps
            node.viewers = sum(s.viewers for s in report.streams)
            node.report_at = record.last_report_at
            # Freshness is settled by the sweep in ``rank`` (the index has no clock); a new
            # report counts as fresh until then.
            node.fresh = True
            self._report_at[slot] = record.last_report_at
            self._oldest_fresh = min(self._oldest_fresh, record.last_report_at)
            loads = report.streams
            streams = tuple(s.stream_id for s in loads)
        self._refresh(slot)
        self._set_streams(slot, streams, loads)

    def _set_streams(
        self, slot: int, streams: tuple[str, ...], loads: tuple[StreamLoad, ...] = ()
    ) -> None:
        old = self._streams_of.get(slot, ())
        if old == streams:  # the usual report: same streams, new numbers
            return
        new_set = set(streams)
        for sid in old:
            if sid not in new_set:
                carriers = self._carriers.get(sid)
                if carriers is not None:
                    carriers.discard(slot)
                    if not carriers:
                        del self._carriers[sid]
                        self._tenants.pop(sid, None)
        for load in loads:
            self._carriers.setdefault(load.stream_id, set()).add(slot)
            self._tenants[load.stream_id] = load.tenant_id
        self._streams_of[slot] = streams

    def tenant_of(self, stream_id: str) -> str | None:
        """The tenant of a stream some node carries (None when no node does)."""
        return self._tenants.get(stream_id)

    @property
    def stream_tenants(self) -> Mapping[str, str]:
        """Stream id -> tenant of every stream some node carries (live, read-only)."""
        return self._tenants

    def _remove(self, node_id: str) -> None:
        slot = self._slots.pop(node_id, None)
        if slot is None:
            return
        self._set_streams(slot, ())
        self._streams_of.pop(slot, None)
        self._nodes[slot] = _Node()
        self._report_at[slot] = math.inf
        self._refresh(slot)
        self._ids[slot] = ""
        self._free.append(slot)

    def set_pending(self, node_id: str, count: int) -> None:
        """Pending redirects of a node (per-replica soft state kept by ``RedirectTracker``)."""
        slot = self._slots.get(node_id)
        if slot is not None:
            self._nodes[slot].pending = count
            self._refresh(slot)

    def carriers(self, stream_id: str) -> int:
        """How many nodes report carrying ``stream_id``."""
        return len(self._carriers.get(stream_id, ()))

    def _sweep_stale(self, now: float) -> None:
        """Mark nodes whose last report is older than the stale window (rarely does work)."""
        horizon = now - self.stale_after_s
        if self._oldest_fresh >= horizon:
            return
        for slot in np.flatnonzero(self._report_at < horizon).tolist():
            node = self._nodes[slot]
            if node.fresh:
                node.fresh = False
                self._report_at[slot] = math.inf  # stays out of sweeps until it reports
                self._refresh(slot)
        self._oldest_fresh = float(self._report_at.min())

    # -- queries ---------------------------------------------------------------------------

    def rank(
        self,
        *,
        content_id: str,
        lat: float | None,
        lon: float | None,
        now: float,
        role: str,
        protocol: str,
        limit: int,
    ) -> tuple[list[Ranked], int]:
        """The best ``limit`` eligible nodes (ties by node id) and how many were considered."""
        considered = len(self._slots)
        if considered == 0 or limit <= 0:
            return [], considered
        need = self._bits.get("role:" + role)
        if need is None:
            return [], considered
        if protocol:
            cap = self._bits.get("cap:" + protocol)
            if cap is None:
                return [], considered
            need |= cap
        self._sweep_stale(now)
        view = self._view(need)
        if view.count == 0:
            return [], considered
        angle: _F | None = None
        if lat is not None and lon is not None:
            la, lo = math.radians(lat), math.radians(lon)
            cos_la = math.cos(la)
            # The viewer's unit vector, shrunk by 1e-14 so that no dot product can round past
            # +-1 (arccos would give NaN): cheaper than clamping 1,000 values, and it moves
            # distances by at most about a metre.
            viewer = self._viewer
            viewer[0] = cos_la * math.cos(lo) * _SHRINK
            viewer[1] = cos_la * math.sin(lo) * _SHRINK
            viewer[2] = math.sin(la) * _SHRINK
            # Preallocated buffers: no allocation per query (they live until the next one).
            angle = np.dot(self._xyz, viewer, out=self._angle_buf)
            np.arccos(angle, out=angle)
            score = np.multiply(self._slope, angle, out=self._score_buf)
            np.subtract(view.score, score, out=score)  # base - (w_geo / pi) * angle
        else:
            # Unknown viewer location: geography is neutral, so no node gets the geo weight.
            score = view.score - np.where(self._slope > 0, self.weights.geo, 0.0)
        carriers = self._carriers.get(content_id) if content_id else None
        if carriers and self.weights.stream_bonus:
            bonus = self.weights.stream_bonus
            if len(carriers) <= 16:  # the usual case: scalar updates beat fancy indexing
                for slot in carriers:
                    score[slot] += bonus
            else:
                score[list(carriers)] += bonus
        return self._top(score, angle, min(limit, view.count)), considered

    def _top(self, score: _F, angle: _F | None, k: int) -> list[Ranked]:
        """Best ``k`` of ``score`` (a scratch array, consumed), ties broken by node id."""
        ids = self._ids
        rows: list[tuple[float, str, int]] = []
        if k <= 8:
            # A few argmax passes beat a partition of the whole fleet for small k.
            for _ in range(k):
                p = int(score.argmax())
                rows.append((-float(score[p]), ids[p], p))
                score[p] = _NEG_INF
            threshold = -rows[-1][0]
            if float(score[score.argmax()]) == threshold:  # a tie at the cut: id order decides
                for p in np.flatnonzero(score == threshold).tolist():
                    rows.append((-threshold, ids[p], p))
        else:
            size = score.size
            threshold = score[np.argpartition(score, size - k)[size - k]]
            rows = [
                (-float(score[p]), ids[p], p) for p in np.flatnonzero(score >= threshold).tolist()
            ]
        rows.sort()
        out: list[Ranked] = []
        for neg, node_id, p in rows[:k]:
            distance = -1.0
            if angle is not None and self._nodes[p].located:
                distance = float(angle[p]) * EARTH_RADIUS_KM
            out.append(Ranked(node_id, -neg, distance))
        return out
