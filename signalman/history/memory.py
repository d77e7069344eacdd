"""In-memory history: the embedded default and the unit-test double of the Redis backend."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pkg.events.sink import Event
from signalman import wire
from signalman.history import (
    TAIL_COUNT,
    AppendResult,
    Entry,
    Expected,
    Fences,
    HistoryInfo,
    SourcePos,
    fence_of,
)


@dataclass
class _Tenant:
    epoch: str
    entries: deque[Entry] = field(default_factory=deque)
    seq: int = 0


class MemoryHistory:
    """Same semantics as ``RedisHistory`` (fence, watermark, offsets, epoch) inside one process."""

    def __init__(self, max_len: int = 10_000) -> None:
        self.max_len = max_len
        self._tenants: dict[str, _Tenant] = {}
        self._fences: dict[tuple[str, int], int] = {}
        self._watermarks: dict[tuple[str, int], int] = {}
        self._changed = asyncio.Condition()  # notified on every append: wakes wait_many

    def _tenant(self, tenant: str, create: bool) -> _Tenant | None:
        state = self._tenants.get(tenant)
        if state is None and create:
            state = self._tenants[tenant] = _Tenant(epoch=uuid.uuid4().hex[:12])
        return state

    async def append(
        self, tenant: str, items: list[tuple[str, Event]], source: SourcePos, fence: int
    ) -> AppendResult:
        part = (source.topic, source.partition)
        current = self._fences.get(part, 0)
        if fence < current:
            return AppendResult("fenced", current_fence=current)
        self._fences[part] = fence
        if source.offset <= self._watermarks.get(part, -1):
            return AppendResult("duplicate", current_fence=fence)
        self._watermarks[part] = source.offset
        state = self._tenant(tenant, create=True)
        assert state is not None
        offsets = []
        for channel, event in items:
            state.seq += 1
            state.entries.append(
                Entry(state.seq, channel, wire.encode_body(event), state.epoch, event.trace)
            )
            offsets.append(state.seq)
        while len(state.entries) > self.max_len:
            state.entries.popleft()
        async with self._changed:
            self._changed.notify_all()
        return AppendResult("appended", tuple(offsets), state.epoch, fence)

    async def append_many(
        self,
        records: list[tuple[str, list[tuple[str, Event]], SourcePos]],
        fence: Fences,
        expect: Expected | None = None,
    ) -> list[AppendResult]:
        behind: dict[tuple[str, int], int] = {}
        for part, want in (expect or {}).items():
            wm = self._watermarks.get(part, -1)
            if 0 <= wm < want:
                behind[part] = wm
        out = []
        for tenant, items, src in records:
            part = (src.topic, src.partition)
            f = fence_of(fence, src)
            if part in behind and f >= self._fences.get(part, 0):
                out.append(AppendResult("behind", current_fence=f, watermark=behind[part]))
            else:
                out.append(await self.append(tenant, items, src, f))
        return out

    def lose_last(self, topic: str, partition: int, tenant: str, count: int) -> None:
        """Forget the last ``count`` appends of a partition (one event each), as a promoted
        replica that lacked them would: the watermark goes back, the entries are gone."""
        state = self._tenants[tenant]
        for _ in range(count):
            state.entries.pop()
        self._watermarks[(topic, partition)] -= count

    async def claim(self, topic: str, partition: int, fence: int) -> int:
        current = max(self._fences.get((topic, partition), 0), fence)
        self._fences[(topic, partition)] = current
        return current

    async def info(self, tenant: str) -> HistoryInfo:
        state = self._tenant(tenant, create=False)
        if state is None:
            return HistoryInfo("", 0, 0)
        first = state.entries[0].offset if state.entries else 0
        return HistoryInfo(state.epoch, first, state.seq)

    async def info_many(self, tenants: Sequence[str]) -> list[HistoryInfo]:
        return [await self.info(tenant) for tenant in tenants]

    async def read_after(self, tenant: str, after: int, limit: int) -> list[Entry]:
        state = self._tenant(tenant, create=False)
        if state is None:
            return []
        out = []
        for entry in state.entries:  # entries are ordered; a deque has no bisect, scan is fine
            if entry.offset > after:
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

    async def wait_many(self, after: Mapping[str, int], wait_s: float) -> dict[str, list[Entry]]:
        def ready() -> bool:
            return any(
                (state := self._tenants.get(t)) is not None and state.seq > pos
                for t, pos in after.items()
            )

        if after and not ready():
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(ready), wait_s)
        out: dict[str, list[Entry]] = {}
        for tenant, pos in after.items():
            entries = await self.read_after(tenant, pos, TAIL_COUNT)
            if entries:
                out[tenant] = entries
        return out

    async def trim(self, tenant: str, max_len: int, min_time: float) -> int:
        state = self._tenant(tenant, create=False)
        if state is None:
            return 0
        dropped = 0
        while state.entries and (len(state.entries) > max_len or state.entries[0].time < min_time):
            state.entries.popleft()
            dropped += 1
        return dropped

    async def tenants(self) -> list[str]:
        return sorted(self._tenants)

    async def watermark(self, topic: str, partition: int) -> int:
        return self._watermarks.get((topic, partition), -1)

    def lose_everything(self) -> None:
        """Simulate a history store that lost its data (tests of epochs and gaps)."""
        self._tenants.clear()
        self._watermarks.clear()

    async def close(self) -> None:
        return None
