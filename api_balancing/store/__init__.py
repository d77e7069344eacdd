"""Foghorn state backends behind one interface (``base.NodeStore``).

``memory.MemoryNodeStore`` is the embedded default (single instance, tests); the Redis store
(``redis_store.py``, HA) shares the same records between replicas: ``keys`` (key schema),
``merge`` (pure merge rules for other replicas' records), ``staging`` (writes behind),
``health`` (degraded-mode tracking) and ``sync`` (changelog reader, tail-first rehydration).
"""

from api_balancing.store.base import NodeStore, StaleWriteError, StoreListener
from api_balancing.store.memory import MemoryNodeStore

__all__ = ["MemoryNodeStore", "NodeStore", "StaleWriteError", "StoreListener"]
