"""The hot path of routing: every node's routing inputs in numpy arrays, scored in one pass.

``FleetIndex`` is fed by store change notifications (local writes and, with HA, other
replicas' writes), so routing reads only local memory. It computes exactly the score of
``scoring.evaluate`` (tests hold the two against each other) but over the whole fleet at once:
about 40 us for 1,000 nodes instead of milliseconds in a Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from api_balancing.model import NodeMode, NodeRecord
from api_balancing.scoring import EARTH_RADIUS_KM, HALF_EARTH_CIRCUMFERENCE_KM, Weights, load_parts

_F = npt.NDArray[np.float64]

# Static rejection codes, known from the record alone (time and query independent).
_OK, _DISCONNECTED, _MAINTENANCE, _DRAINING, _NO_REPORT, _CAPACITY_ZERO = range(6)


@dataclass(frozen=True)
class Ranked:
    """One routing result: node id, its score and distance (-1 when unknown)."""

    node_id: str
    score: float
    distance_km: float


class FleetIndex:
    """Columnar copy of the fleet, updated per node, queried per viewer."""

    def __init__(self, weights: Weights, initial_capacity: int = 256) -> None:
        self.weights = weights
        self._slots: dict[str, int] = {}
        self._ids: list[str] = []
        self._free: list[int] = []
        self._bits: dict[str, int] = {}  # role / capability name -> bit
        self._carriers: dict[str, set[int]] = {}  # stream id -> slots carrying it
        self._streams_of: dict[int, tuple[str, ...]] = {}
        self._alloc(initial_capacity)

    # -- storage ---------------------------------------------------------------------------

    def _alloc(self, n: int) -> None:
        self._status = np.full(n, _DISCONNECTED, dtype=np.int8)
        self._load = np.zeros(n)  # cpu + ram parts
        self._up = np.zeros(n)
        self._limit = np.zeros(n)
        self._viewers = np.zeros(n)
        self._capacity = np.zeros(n)
        self._report_at = np.zeros(n)
        self._lat = np.zeros(n)  # radians
        self._lon = np.zeros(n)
        self._coslat = np.zeros(n)
        self._has_loc = np.zeros(n, dtype=bool)
        self._bitset = np.zeros(n, dtype=np.int64)
        self._pending = np.zeros(n)

    def _grow(self) -> None:
        old = len(self._status)
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        self._alloc(old * 2)
        for name, arr in arrays.items():
            getattr(self, name)[:old] = arr

    def _bit(self, name: str) -> int:
        bit = self._bits.get(name)
        if bit is None:
            if len(self._bits) >= 62:
                return 0  # more distinct names than bits: such a name never matches
            bit = 1 << len(self._bits)
            self._bits[name] = bit
        return bit

    def __len__(self) -> int:
        return len(self._slots)

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
            else:
                slot = len(self._ids)
                if slot >= len(self._status):
                    self._grow()
                self._ids.append(node_id)
            self._slots[node_id] = slot
            self._pending[slot] = 0.0
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
        self._status[slot] = status
        bits = 0
        for name in ident.roles:
            bits |= self._bit("role:" + name)
        for name in ident.capabilities:
            bits |= self._bit("cap:" + name)
        self._bitset[slot] = bits
        self._capacity[slot] = ident.capacity
        loc = ident.location
        self._has_loc[slot] = loc is not None
        if loc is not None:
            lat = math.radians(loc.latitude)
            self._lat[slot] = lat
            self._lon[slot] = math.radians(loc.longitude)
            self._coslat[slot] = math.cos(lat)
        streams: tuple[str, ...] = ()
        if report is not None:
            cpu, ram = load_parts(
                report.cpu_percent, report.ram_used_bytes, report.ram_max_bytes, self.weights
            )
            self._load[slot] = cpu + ram
            self._up[slot] = report.upload_bps
            self._limit[slot] = report.bandwidth_limit_bps
            self._viewers[slot] = sum(s.viewers for s in report.streams)
            self._report_at[slot] = record.last_report_at
            streams = tuple(s.stream_id for s in report.streams)
        self._set_streams(slot, streams)

    def _set_streams(self, slot: int, streams: tuple[str, ...]) -> None:
        old = self._streams_of.get(slot, ())
        if old == streams:
            return
        new_set = set(streams)
        for sid in old:
            if sid not in new_set:
                carriers = self._carriers.get(sid)
                if carriers is not None:
                    carriers.discard(slot)
                    if not carriers:
                        del self._carriers[sid]
        for sid in new_set:
            self._carriers.setdefault(sid, set()).add(slot)
        self._streams_of[slot] = streams

    def _remove(self, node_id: str) -> None:
        slot = self._slots.pop(node_id, None)
        if slot is None:
            return
        self._set_streams(slot, ())
        self._streams_of.pop(slot, None)
        self._status[slot] = _DISCONNECTED
        self._pending[slot] = 0.0
        self._ids[slot] = ""
        self._free.append(slot)

    def set_pending(self, node_id: str, count: int) -> None:
        """Pending redirects of a node (per-replica soft state kept by ``RedirectTracker``)."""
        slot = self._slots.get(node_id)
        if slot is not None:
            self._pending[slot] = count

    def carriers(self, stream_id: str) -> int:
        """How many nodes report carrying ``stream_id``."""
        return len(self._carriers.get(stream_id, ()))

    # -- queries ---------------------------------------------------------------------------

    def rank(
        self,
        *,
        content_id: str,
        lat: float | None,
        lon: float | None,
        now: float,
        stale_after_s: float,
        role: str,
        protocol: str,
        redirect_bps: float,
        limit: int,
    ) -> tuple[list[Ranked], int]:
        """The best ``limit`` eligible nodes (ties by node id) and how many were considered."""
        n = len(self._ids)
        considered = len(self._slots)
        if n == 0 or limit <= 0:
            return [], considered
        need = self._bits.get("role:" + role)
        if need is None:
            return [], considered
        if protocol:
            cap = self._bits.get("cap:" + protocol)
            if cap is None:
                return [], considered
            need |= cap
        ok = self._status[:n] == _OK
        ok &= self._report_at[:n] >= now - stale_after_s
        ok &= (self._bitset[:n] & need) == need
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return [], considered
        pending = self._pending[idx]
        used = self._up[idx] + pending * redirect_bps
        limit_bps = self._limit[idx]
        fits = (used < limit_bps) & (self._viewers[idx] + pending < self._capacity[idx])
        if not fits.all():
            idx, used, limit_bps = idx[fits], used[fits], limit_bps[fits]
            if idx.size == 0:
                return [], considered
        w = self.weights
        score = self._load[idx] + w.bandwidth * (1.0 - used / limit_bps)
        dist: _F | None = None
        if lat is not None and lon is not None:
            la, lo = math.radians(lat), math.radians(lon)
            h = (
                np.sin((self._lat[idx] - la) / 2) ** 2
                + math.cos(la) * self._coslat[idx] * np.sin((self._lon[idx] - lo) / 2) ** 2
            )
            d = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(h, 1.0)))
            has = self._has_loc[idx]
            dist = np.where(has, d, -1.0)
            score = score + np.where(has, w.geo * (1.0 - d / HALF_EARTH_CIRCUMFERENCE_KM), 0.0)
        carriers = self._carriers.get(content_id) if content_id else None
        if carriers and w.stream_bonus:
            score = score + w.stream_bonus * np.isin(idx, np.fromiter(carriers, dtype=np.int64))
        return self._top(idx, score, dist, limit), considered

    def _top(self, idx: npt.NDArray[np.int64], score: _F, dist: _F | None, k: int) -> list[Ranked]:
        if idx.size > k * 4:
            part = np.argpartition(-score, k - 1)
            threshold = score[part[k - 1]]
            # Keep every node tied with the k-th so the id tie-break sees all of them.
            pick = np.flatnonzero(score >= threshold)
        else:
            pick = np.arange(idx.size)
        ids = self._ids
        rows = [(-float(score[p]), ids[int(idx[p])], int(p)) for p in pick]
        rows.sort()
        out: list[Ranked] = []
        for neg, node_id, p in rows[:k]:
            out.append(Ranked(node_id, -neg, float(dist[p]) if dist is not None else -1.0))
        return out
