"""The hot path of routing: every node's routing inputs in numpy arrays, scored per query.

``FleetIndex`` is fed by store change notifications (local writes and, with HA, other
replicas' writes), so routing reads only local memory. It computes the score of
``scoring.evaluate`` (tests hold the two against each other).

Everything that does not depend on the viewer is kept ready per node as it changes: whether
the node can take a viewer at all (connected, normal mode, fresh report, bandwidth and seats
left after pending redirects) and its CPU + RAM + bandwidth score plus the full geo weight.
For each (role, protocol) asked for, a cached column holds that score for the nodes that
qualify and -inf for the others, patched in place when a node changes. A node's score for a
viewer is that base minus ``(w_geo / pi) * angle`` (the great-circle angle from the viewer,
arccos of a dot product of unit vectors), plus the stream bonus for carriers.

Scoring every node per query made routing cost grow with the fleet (at 10,000 nodes the
arccos alone took about 100 us). So nodes are also grouped in cells of a coarse latitude /
longitude grid, each cell a spherical cap (its box centre and the largest angle from there to a
member), and each cached column keeps its best base per cell. Per query, a few operations over
the cells (hundreds at most, not thousands of nodes) bound every cell: its best member scores at
least its best base less the penalty of the cap's farthest point, so the ``limit``-th best of
those is a floor for the answer; and no member scores more than its own base less the penalty
of the cap's nearest point. Only the members of the cells that can reach the floor are looked
at, only those whose own bound reaches it are scored, with the carriers of the stream (their
bonus added) apart. Whatever is left out scores strictly below ``limit`` nodes that are in, so
the answer is the one scoring every node gives (``rank(..., exhaustive=True)``, which is also
the path for small fleets; tests hold the two equal to the bit): the same arithmetic per node,
in the same order, on fewer nodes. A cap is plain 3-D geometry, so the antimeridian and the
poles need no special case; nodes without a location share one cell whose penalty is zero, as
theirs is.

Distances from unit vectors (arccos of a dot product) equal the reference haversine to within
about a metre.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from api_balancing.model import NodeIdentity, NodeMode, NodeRecord, StreamLoad
from api_balancing.scoring import EARTH_RADIUS_KM, Weights, load_parts

_F = npt.NDArray[np.float64]
_NEG_INF = -math.inf
_LOWEST = -sys.float_info.max  # below every finite score, above -inf (the ineligible)
_SHRINK = 1.0 - 1e-14
CELL_DEG = 4.0  # grid step of the cells: 45 x 90 cells at most, a few hundred in a real fleet
# Slack on every cap's radius (radians, about 6 m): arccos near 0 is only as precise as
# ~1e-8 rad, and the viewer's shrink adds up to 1.5e-7; the bound must never exceed a score.
_CELL_MARGIN = 1e-6
_NO_CELL = -1

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
    cellmax: _F  # per cell: the best ``score`` among its members (-inf when none qualifies)
    dirty: set[int]  # cells whose maximum may have dropped: recomputed before the next query


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
        # Views of at most this many eligible nodes are scanned whole: below it the scan's
        # few whole-column operations cost less than the search's many small ones.
        self.scan_max = 2048
        # And a query whose candidate cells hold more than this share of the fleet is scanned
        # (a fleet in a few cells, a viewer amid most of it): gathers would cost more.
        self.scan_share = 0.5
        self._oldest_fresh = math.inf  # lower bound of report times among fresh nodes
        # The cells: id 0 holds the nodes without a location, the others one grid box each.
        self._cell_of: list[int] = []  # per slot (_NO_CELL for free slots)
        self._cell_ids: dict[tuple[int, int], int] = {}
        self._members: list[set[int]] = [set()]
        self._member_arrays: list[npt.NDArray[np.intp] | None] = [None]
        self._centres: _F = np.zeros((0, 3))  # per cell: its box centre (unit vector)
        self._radius: _F = np.zeros(0)  # and the largest angle from there to a member
        self._sizes: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)  # members
        self._cells_alloc(16)
        self._alloc(initial_capacity)

    # -- storage ---------------------------------------------------------------------------

    def _alloc(self, n: int) -> None:
        # Unit vector of each node's location (0 when unknown), one row per coordinate.
        self._xyz = np.zeros((3, n))
        self._slope = np.zeros(n)  # w_geo / pi for located nodes: geo = w_geo - slope * angle
        self._base = np.full(n, _NEG_INF)  # cpu + ram + bandwidth + w_geo, or -inf
        self._report_at = np.full(n, math.inf)  # for the staleness sweep
        self._angle_buf = np.zeros(n)
        self._viewer = np.zeros(3)
        self._viewer_column = self._viewer[:, np.newaxis]  # a view: broadcasts over the nodes
        self._xyz_buf = np.zeros((3, n))
        self._score_buf = np.zeros(n)
        self._is_carrier = np.zeros(n, dtype=bool)  # the asked stream's carriers, per query
        self._capacity_slots = n

    def _cells_alloc(self, n: int) -> None:
        centres, radius = np.zeros((n, 3)), np.zeros(n)
        sizes = np.zeros(n, dtype=np.intp)
        old = len(self._centres)
        centres[:old], radius[:old], sizes[:old] = self._centres, self._radius, self._sizes
        for view in self._views.values():
            cellmax = np.full(n, _NEG_INF)
            cellmax[:old] = view.cellmax
            view.cellmax = cellmax
        self._centres, self._radius, self._sizes = centres, radius, sizes

    def _cell(self, lat: float, lon: float) -> int:
        """The cell of a location (created on first use)."""
        rows = int(180 / CELL_DEG)
        key = (min(rows - 1, int((lat + 90.0) // CELL_DEG)), int((lon + 180.0) % 360.0 // CELL_DEG))
        cell = self._cell_ids.get(key)
        if cell is None:
            cell = len(self._members)
            if cell >= len(self._centres):
                self._cells_alloc(cell * 2)
            self._cell_ids[key] = cell
            self._members.append(set())
            self._member_arrays.append(None)
            clat = math.radians(-90.0 + (key[0] + 0.5) * CELL_DEG)
            clon = math.radians(-180.0 + (key[1] + 0.5) * CELL_DEG)
            self._centres[cell] = (math.cos(clat) * math.cos(clon),
                                   math.cos(clat) * math.sin(clon), math.sin(clat))  # fmt: skip
        return cell

    def _move(self, slot: int, cell: int) -> None:
        """Make ``slot`` a member of ``cell`` (``_NO_CELL``: of none)."""
        old = self._cell_of[slot]
        if old != cell:
            for c in (old, cell):
                if c != _NO_CELL:
                    self._member_arrays[c] = None
                    for view in self._views.values():
                        view.dirty.add(c)  # its maximum is recomputed from its members
            if old != _NO_CELL:
                self._members[old].discard(slot)
                self._sizes[old] -= 1
            self._cell_of[slot] = cell
            if cell != _NO_CELL:
                self._members[cell].add(slot)
                self._sizes[cell] += 1
        if cell not in (0, _NO_CELL):  # the cap grows to take the member in (never shrinks)
            dot = float(np.dot(self._centres[cell], self._xyz[:, slot]))
            angle = math.acos(max(-1.0, min(1.0, dot))) + _CELL_MARGIN
            self._radius[cell] = max(float(self._radius[cell]), angle)

    def _cell_members(self, cell: int) -> npt.NDArray[np.intp]:
        arr = self._member_arrays[cell]
        if arr is None:
            members = self._members[cell]
            arr = self._member_arrays[cell] = np.fromiter(members, np.intp, len(members))
        return arr

    def _grow(self) -> None:
        old = self._capacity_slots
        xyz, slope, base, report_at = self._xyz, self._slope, self._base, self._report_at
        self._alloc(old * 2)
        self._xyz[:, :old] = xyz
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
        cell = self._cell_of[slot]
        for view in self._views.values():
            old = float(view.score[slot])
            new = value if (node.bits & view.need) == view.need else _NEG_INF
            if old != new:
                view.count += int(new != _NEG_INF) - int(old != _NEG_INF)
                view.score[slot] = new
                if cell != _NO_CELL:
                    best = view.cellmax[cell]
                    if new > best:
                        view.cellmax[cell] = new
                    elif old == best:  # the best may have gone down: recomputed when asked
                        view.dirty.add(cell)

    def _view(self, need: int) -> _View:
        view = self._views.get(need)
        if view is None:
            qualifies = np.zeros(self._capacity_slots, dtype=bool)
            for slot, node in enumerate(self._nodes):
                qualifies[slot] = (node.bits & need) == need
            score = np.where(qualifies, self._base, _NEG_INF)
            cellmax = np.full(len(self._centres), _NEG_INF)
            in_cell = np.array(self._cell_of, dtype=np.intp)
            placed = in_cell != _NO_CELL
            np.maximum.at(cellmax, in_cell[placed], score[: len(in_cell)][placed])
            count = int(np.count_nonzero(score != _NEG_INF))
            view = _View(need, score, count, cellmax, set())
            self._views[need] = view
        elif view.dirty:
            for cell in view.dirty:
                members = self._cell_members(cell)
                view.cellmax[cell] = view.score[members].max() if members.size else _NEG_INF
            view.dirty.clear()
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
                self._cell_of.append(_NO_CELL)
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
                self._xyz[:, slot] = (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon),
                                   math.sin(lat))  # fmt: skip
                self._slope[slot] = self.weights.geo / math.pi
                self._move(slot, self._cell(loc.latitude, loc.longitude))
            else:
                self._xyz[:, slot] = (0.0, 0.0, 0.0)
                self._slope[slot] = 0.0
                self._move(slot, 0)
        streams: tuple[str, ...] = ()
        loads: tuple[StreamLoad, ...] = ()
        if report is not None:
            cpu, ram = load_parts(
                report.cpu_percent, report.ram_used_bytes, report.ram_max_bytes, self.weights
            )
            node.load = cpu + ram
            node.up = report.upload_bps
            node.limit = report.bandwidth_limit_bps
            node.viewers = report.viewers
            node.report_at = record.last_report_at
            # Freshness is settled by the sweep in ``rank`` (the index has no clock); a new
            # report counts as fresh until then.
            node.fresh = True
            self._report_at[slot] = record.last_report_at
            self._oldest_fresh = min(self._oldest_fresh, record.last_report_at)
            loads = report.streams
            streams = report.stream_ids
        self._refresh(slot)
        self._set_streams(slot, streams, loads)

    def _set_streams(
        self, slot: int, streams: tuple[str, ...], loads: tuple[StreamLoad, ...] = ()
    ) -> None:
        old = self._streams_of.get(slot, ())
        if old is streams or old == streams:  # the usual report: same streams, new numbers
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
        self._move(slot, _NO_CELL)
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
        exhaustive: bool = False,
    ) -> tuple[list[Ranked], int]:
        """The best ``limit`` eligible nodes (ties by node id) and how many were considered.

        ``exhaustive``: score every eligible node instead of searching the cells (the
        specification the search is tested against; same result, slower).
        """
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
        located = lat is not None and lon is not None
        if lat is not None and lon is not None:
            la, lo = math.radians(lat), math.radians(lon)
            cos_la = math.cos(la)
            # The viewer's unit vector, shrunk by 1e-14 so that no dot product can round past
            # +-1 (arccos would give NaN): cheaper than clamping, and it moves distances by at
            # most about a metre.
            viewer = self._viewer
            viewer[0] = cos_la * math.cos(lo) * _SHRINK
            viewer[1] = cos_la * math.sin(lo) * _SHRINK
            viewer[2] = math.sin(la) * _SHRINK
        carriers = self._carriers.get(content_id) if content_id else None
        if not self.weights.stream_bonus:
            carriers = None
        k = min(limit, view.count)
        if exhaustive or view.count <= self.scan_max:
            return self._scan(view, k, located, carriers), considered
        marked: npt.NDArray[np.intp] | None = None
        if carriers:
            marked = np.fromiter(carriers, np.intp, len(carriers))
            self._is_carrier[marked] = True
        try:
            found = self._search(view, k, located, marked)
        finally:
            if marked is not None:
                self._is_carrier[marked] = False
        if found is None:  # the cells cannot narrow this query down: scan (same answer)
            return self._scan(view, k, located, carriers), considered
        return self._top(*found, k), considered

    def _exact(
        self, view: _View, slots: npt.NDArray[np.intp], located: bool, carriers_from: int
    ) -> tuple[_F, _F | None]:
        """Scores (and angles, when the viewer is located) of ``slots``, the carriers of the
        asked stream from index ``carriers_from`` on: the arithmetic of ``_scan``, element by
        element, so that both give the same numbers."""
        base = view.score[slots]
        angle: _F | None = None
        if located:
            xyz = np.take(self._xyz, slots, axis=1)
            xyz *= self._viewer_column
            dot = np.add(xyz[0], xyz[1], out=xyz[0])
            dot += xyz[2]
            angle = np.arccos(dot, out=dot)
            score = np.subtract(base, np.multiply(self._slope[slots], angle, out=xyz[1]), out=base)
        else:
            # Unknown viewer location: geography is neutral, so no node gets the geo weight.
            score = np.subtract(base, np.where(self._slope[slots] > 0, self.weights.geo, 0.0),
                                out=base)  # fmt: skip
        if carriers_from < len(slots):
            score[carriers_from:] += self.weights.stream_bonus
        return score, angle

    def _scan(self, view: _View, k: int, located: bool, carriers: set[int] | None) -> list[Ranked]:
        """Score every node: ``_exact``'s arithmetic on whole columns (cheaper than the search
        for a small fleet; the reference the search is tested against)."""
        angle: _F | None = None
        if located:
            xyz = np.multiply(self._xyz, self._viewer_column, out=self._xyz_buf)
            dot, tmp = self._angle_buf, self._score_buf
            np.add(xyz[0], xyz[1], out=dot)
            dot += xyz[2]
            angle = np.arccos(dot, out=dot)
            score = np.subtract(view.score, np.multiply(self._slope, angle, out=tmp), out=tmp)
        else:
            score = view.score - np.where(self._slope > 0, self.weights.geo, 0.0)
        if carriers:
            bonus = self.weights.stream_bonus
            if len(carriers) <= 16:  # the usual case: scalar updates beat fancy indexing
                for slot in carriers:
                    score[slot] += bonus
            else:
                score[list(carriers)] += bonus
        return self._top_scan(score, angle, k)

    def _top_scan(self, score: _F, angle: _F | None, k: int) -> list[Ranked]:
        """Best ``k`` of a whole column of scores (consumed), ties broken by node id."""
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

    def _search(
        self,
        view: _View,
        k: int,
        located: bool,
        carriers: npt.NDArray[np.intp] | None,
    ) -> tuple[npt.NDArray[np.intp], _F, _F | None] | None:
        """Slots, scores and angles of a set of nodes that holds the best ``k`` (see the module
        docstring): every node left out scores strictly below ``k`` of those in the set. None
        when the cells would leave out too little to beat a scan (a fleet in fewer cells than
        ``k``, or most of it near the viewer)."""
        cells = len(self._members)
        if located:
            # Per cell, the nearest and the farthest a member can be from the viewer.
            gap = np.arccos(np.dot(self._centres[:cells], self._viewer))
            radius = self._radius[:cells]
            near = np.subtract(gap, radius)
            np.maximum(near, 0.0, out=near)
            near *= self.weights.geo / math.pi
            far = np.add(gap, radius, out=gap)
            far *= self.weights.geo / math.pi
        else:
            near = np.full(cells, self.weights.geo)
            far = near.copy()
        near[0] = far[0] = 0.0  # nodes without a location: no geo weight in their base
        best = view.cellmax[:cells]
        # A floor for the k-th best score: the best member of a cell scores at least its base
        # less the cell's farthest penalty, and k cells give k such nodes.
        floor = _LOWEST  # fewer than k cells with an eligible node: no floor from the cells
        if cells >= k:
            low = np.subtract(best, far, out=far)
            floor = max(_LOWEST, float(np.partition(low, cells - k)[cells - k]))
        # Every node that can reach the floor: the members of the cells whose best base less
        # their nearest penalty reaches it, whose own base less that penalty reaches it.
        reach = np.flatnonzero(best - near >= floor)
        if int(self._sizes[reach].sum()) > self.scan_share * len(self._slots):
            return None
        arrays = [self._cell_members(c) for c in reach.tolist()]
        members = np.concatenate(arrays) if arrays else np.zeros(0, np.intp)
        keep = view.score[members] - np.repeat(near[reach], self._sizes[reach]) >= floor
        slots = members[keep]
        if carriers is not None:  # scored apart, with their bonus
            # Dropped from the few kept, not masked over every member: the same slots in the
            # same order, without a gather over thousands.
            slots = slots[~self._is_carrier[slots]]
            kept = len(slots)
            slots = np.concatenate((slots, carriers[view.score[carriers] != _NEG_INF]))
            score, angle = self._exact(view, slots, located, kept)
        else:
            score, angle = self._exact(view, slots, located, len(slots))
        return slots, score, angle

    def _top(
        self, slots: npt.NDArray[np.intp], score: _F, angle: _F | None, k: int
    ) -> list[Ranked]:
        """Best ``k`` of the scored ``slots``, ties broken by node id."""
        ids = self._ids
        size = score.size
        k = min(k, size)
        if k <= 0:
            return []
        threshold = score[np.argpartition(score, size - k)[size - k]]
        rows = [
            (-float(score[i]), ids[int(slots[i])], i)
            for i in np.flatnonzero(score >= threshold).tolist()
        ]
        rows.sort()
        out: list[Ranked] = []
        for neg, node_id, i in rows[:k]:
            distance = -1.0
            if angle is not None and self._nodes[int(slots[i])].located:
                distance = float(angle[i]) * EARTH_RADIUS_KM
            out.append(Ranked(node_id, -neg, distance))
        return out
