"""Foghorn state backends behind one interface (``base.NodeStore``).

``memory.MemoryNodeStore`` is the embedded default (single instance, tests); the Redis store
(``redis*.py``, HA) shares the same records between replicas.
"""

from api_balancing.store.base import NodeStore, StaleWriteError, StoreListener
from api_balancing.store.memory import MemoryNodeStore

__all__ = ["MemoryNodeStore", "NodeStore", "StaleWriteError", "StoreListener"]
