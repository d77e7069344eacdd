"""The one interface every Foghorn state backend implements.

Contract (the Redis/HA store implements exactly this; Foghorn's logic cannot tell them apart):

* The unit of state is a whole ``NodeRecord`` per node id: identity, mode, last good report,
  connection and owner metadata, counters. Writers always write the complete record.
* ``put(record)`` stores it and returns the stored copy with ``version`` set by the store to a
  value strictly greater than every earlier version of that node (a per-node monotonic
  counter). A backend with ownership fencing raises ``StaleWriteError`` when the record's
  ``owner_fence`` is lower than the stored one: a stale owner can never overwrite a newer one.
* ``stage(record)`` is ``put`` for load reports: the record is applied locally at once and
  reaches the shared source shortly after (a backend may coalesce a node's staged records,
  newest wins, and waits only to bound how far a node runs ahead). A backend with fencing
  raises ``StaleWriteError`` for a stale fence it can see locally; a refusal found later is
  the backend's to act on (the Redis store closes the node's stream). In memory it is ``put``.
* ``delete(node_id)`` removes the node (eviction); deleting an unknown id is a no-op.
* ``get`` / ``snapshot`` are synchronous reads of the replica's local copy: routing reads only
  local memory and never waits on the network. Backends keep that copy converged (write
  through plus a replayable change feed from other replicas).
* Listeners added with ``add_listener`` are called, on the event loop, with the new record
  (or ``None`` after a delete) after every change, local or remote, in version order per node.
  Foghorn keeps its routing index and stream index current this way.
* ``healthy()`` reports whether the backend is in sync with its shared source (always true in
  memory); routing keeps answering from local state when it is not.

Per-replica soft state (pending-redirect penalties, open control streams) never goes here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from api_balancing.model import NodeRecord

StoreListener = Callable[[str, NodeRecord | None], None]


class StaleWriteError(Exception):
    """A write carried an older fencing token than the stored record: it was refused."""


@runtime_checkable
class NodeStore(Protocol):
    """Whole-record node state with local reads and change notifications."""

    async def start(self) -> None:
        """Load initial state (and start syncing, for shared backends)."""

    async def close(self) -> None:
        """Stop syncing and release connections."""

    async def put(self, record: NodeRecord) -> NodeRecord:
        """Store ``record`` whole; return it with its new ``version``."""

    async def stage(self, record: NodeRecord) -> NodeRecord:
        """Store ``record`` whole, applied locally at once, written to a shared source
        without waiting for it (load reports); return it with its new ``version``."""

    async def delete(self, node_id: str) -> None:
        """Forget a node (eviction)."""

    def get(self, node_id: str) -> NodeRecord | None:
        """The local copy of one node, or None."""

    def snapshot(self) -> list[NodeRecord]:
        """The local copy of every node."""

    def add_listener(self, listener: StoreListener) -> None:
        """Call ``listener(node_id, record_or_None)`` after every change."""

    def healthy(self) -> bool:
        """True while the local copy is in sync with the shared source."""
