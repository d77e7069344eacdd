"""Signalman's partition ownership: PostgreSQL advisory locks with fencing tokens.

The implementation is ``pkg.coord.advisory`` (the PostgreSQL side of the coordination
primitives); these names stay importable from here for Signalman's modules.
"""

from pkg.coord.advisory import LockBusy, OwnershipLost, PartitionLocks, lock_key

__all__ = ["LockBusy", "OwnershipLost", "PartitionLocks", "lock_key"]
