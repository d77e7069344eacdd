"""Staged node writes: per node at most one write in flight and one staged behind it.

Pure bookkeeping (no Redis, no wire): the Redis store stages records here, asks which ones to
send, and says how each sent write ended. The rules:

* **Newest wins.** ``stage(node, record)`` makes ``record`` the node's staged record; a record
  already staged but not yet sent is replaced. Records are whole node states, so the newest
  carries everything the replaced one did: writing only it loses nothing (coalescing).
* **One in flight per node.** A record staged while the node's previous write travels is held
  back until that write ended; ``take`` hands out only nodes with nothing in flight. So two
  batches on different connections can never reorder one node's writes.
* **Backpressure per node.** A stage on a node that already had one write in flight *and* one
  staged replaces the staged record (the caller's state is applied and will be written) and
  returns the in-flight write's end for the caller to await before it reads more: a node can
  never run more than one record ahead of Redis, and nothing here grows with the report rate.
* **Confirmation.** ``stage(..., confirm=True)`` returns a future resolved when the write that
  carries the record, or a newer record that replaced it, ended (failed with the write's
  refusal, if it was refused). Lifecycle writes (registration, mode, disconnect) wait on it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")


class _Slot(Generic[R]):
    """One node's write state."""

    __slots__ = ("flight_done", "flight_waiters", "in_flight", "staged", "staged_waiters")

    def __init__(self) -> None:
        self.staged: R | None = None
        self.staged_waiters: list[asyncio.Future[None]] | None = None
        self.in_flight = False
        self.flight_waiters: list[asyncio.Future[None]] | None = None
        self.flight_done: asyncio.Future[None] | None = None  # created when someone waits


@dataclass
class StagingCounters:
    staged: int = 0  # records staged (every write of a node goes through here)
    coalesced: int = 0  # staged records replaced by a newer one before they were sent
    waits: int = 0  # stages that had to wait for the node's in-flight write (backpressure)


class NodeWrites(Generic[R]):
    """The staging rules of the module docstring, for records of type ``R`` keyed by node id."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot[R]] = {}
        # Nodes with a staged record and nothing in flight, in staging order (FIFO). An
        # OrderedDict: taking the oldest from a plain dict (next(iter) then del) scans the
        # deleted entries left at its front, again for every node of every batch.
        self._ready: OrderedDict[str, None] = OrderedDict()
        self.counters = StagingCounters()

    def stage(
        self, node_id: str, record: R, *, confirm: bool = False
    ) -> asyncio.Future[None] | None:
        """Stage ``record`` as the node's latest; returns what the caller must await, if anything:
        with ``confirm`` the end of the write carrying it, else (backpressure) the end of the
        node's in-flight write when one was in flight and another staged already."""
        slot = self._slots.get(node_id)
        if slot is None:
            slot = self._slots[node_id] = _Slot()
        self.counters.staged += 1
        full = slot.in_flight and slot.staged is not None
        if slot.staged is not None:
            self.counters.coalesced += 1
        slot.staged = record
        if not slot.in_flight:
            self._ready[node_id] = None
        if confirm:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if slot.staged_waiters is None:
                slot.staged_waiters = [future]
            else:
                slot.staged_waiters.append(future)
            return future
        if not full:
            return None
        self.counters.waits += 1
        if slot.flight_done is None:
            slot.flight_done = asyncio.get_running_loop().create_future()
        return slot.flight_done

    def __bool__(self) -> bool:
        """True while some node has a record ready to send."""
        return bool(self._ready)

    def ready_count(self) -> int:
        return len(self._ready)

    def take(self, limit: int) -> list[tuple[str, R]]:
        """Up to ``limit`` ready records, oldest first; their nodes are in flight from now on."""
        out: list[tuple[str, R]] = []
        ready, slots = self._ready, self._slots
        while ready and len(out) < limit:
            node_id = ready.popitem(last=False)[0]
            slot = slots[node_id]
            record = slot.staged
            assert record is not None  # only staged, idle nodes are ready
            slot.staged = None
            slot.in_flight = True
            slot.flight_waiters, slot.staged_waiters = slot.staged_waiters, None
            out.append((node_id, record))
        return out

    def finish(self, node_id: str, error: BaseException | None = None) -> bool:
        """The node's in-flight write ended (``error``: it was refused). Wakes its waiters, and
        makes the record staged behind it ready. True when a confirmation waiter was told."""
        slot = self._slots.get(node_id)
        if slot is None or not slot.in_flight:
            return False
        slot.in_flight = False
        waiters, slot.flight_waiters = slot.flight_waiters, None
        told = _settle(waiters, error)
        done, slot.flight_done = slot.flight_done, None
        if done is not None and not done.done():
            done.set_result(None)  # backpressure only: the caller's own record is still staged
        if slot.staged is not None:
            self._ready[node_id] = None
        else:
            del self._slots[node_id]  # idle nodes keep nothing here
        return told

    def staged(self, node_id: str) -> R | None:
        """The node's staged record (not yet sent), or None."""
        slot = self._slots.get(node_id)
        return slot.staged if slot is not None else None

    def in_flight(self, node_id: str) -> bool:
        slot = self._slots.get(node_id)
        return slot is not None and slot.in_flight

    def drop_staged(self, node_id: str, error: BaseException) -> R | None:
        """Discard the node's staged record (its write must not happen); its confirmation
        waiters get ``error``. Returns the dropped record."""
        slot = self._slots.get(node_id)
        if slot is None or slot.staged is None:
            return None
        record, slot.staged = slot.staged, None
        waiters, slot.staged_waiters = slot.staged_waiters, None
        _settle(waiters, error)
        self._ready.pop(node_id, None)
        if not slot.in_flight:
            del self._slots[node_id]
        return record

    def __len__(self) -> int:
        """Nodes with a write staged or in flight."""
        return len(self._slots)


def _settle(waiters: list[asyncio.Future[None]] | None, error: BaseException | None) -> bool:
    told = False
    for future in waiters or ():
        if future.done():  # its caller was cancelled meanwhile
            continue
        told = True
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    return told
