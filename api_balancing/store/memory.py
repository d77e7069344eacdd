"""The embedded store: a dict in this process. Default for single instances and tests."""

from __future__ import annotations

import structlog

from api_balancing.model import NodeRecord, evolve
from api_balancing.store.base import StaleWriteError, StoreListener

log = structlog.get_logger("foghorn.store")


class MemoryNodeStore:
    """``NodeStore`` on a dict; versions are per-node counters kept across deletes."""

    def __init__(self) -> None:
        self._records: dict[str, NodeRecord] = {}
        self._versions: dict[str, int] = {}
        self._listeners: list[StoreListener] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def put(self, record: NodeRecord) -> NodeRecord:
        node_id = record.node_id
        current = self._records.get(node_id)
        if current is not None and record.owner_fence < current.owner_fence:
            raise StaleWriteError(
                f"node {node_id!r}: fence {record.owner_fence} < stored {current.owner_fence}"
            )
        version = self._versions.get(node_id, 0) + 1
        self._versions[node_id] = version
        stored = evolve(record, version=version)
        self._records[node_id] = stored
        self._notify(node_id, stored)
        return stored

    # In memory there is nothing to write behind: staging is ``put`` (no extra frame).
    stage = put

    async def delete(self, node_id: str) -> None:
        if self._records.pop(node_id, None) is not None:
            self._notify(node_id, None)

    def get(self, node_id: str) -> NodeRecord | None:
        return self._records.get(node_id)

    def snapshot(self) -> list[NodeRecord]:
        return list(self._records.values())

    def add_listener(self, listener: StoreListener) -> None:
        self._listeners.append(listener)

    def healthy(self) -> bool:
        return True

    def _notify(self, node_id: str, record: NodeRecord | None) -> None:
        for listener in self._listeners:
            try:
                listener(node_id, record)
            except Exception:  # a broken listener must not break writes
                log.exception("store listener failed", node_id=node_id)
