"""The coordination primitives as small protocols, so services depend on what a primitive
does, not on the store that provides it (the DCS of this codebase, in Patroni's terms).

- ``Lease`` (a leader term with an epoch): Redis ``lease.LeaderLease``; PostgreSQL
  ``advisory.AdvisoryLease`` (Signalman's singleton duties).
- ``FencedOwnership`` (one owner per resource, a strictly higher fence per acquisition):
  Redis ``ownership.OwnerClaims`` over ``ownership.Ownership`` records (Foghorn's node streams
  use the records directly); PostgreSQL ``advisory.PartitionLocks`` (Signalman's partitions).
- ``FenceCheck`` (a write is accepted only with the newest fence): Redis
  ``fencing.FencedHash``; Signalman's history (``signalman.history.redis.RedisHistory``, whose
  fences come from PostgreSQL).
- ``ChangelogWriter`` (replayable, numbered, gap-detected): Redis ``changelog.Changelog``
  (Signalman's changelog is Kafka).

Every token these issue only grows, also across a store failover: Redis behind Sentinel
through the failover epoch (``pkg.coord.era``), PostgreSQL through the WAL timeline
(``pkg.coord.advisory``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable


@runtime_checkable
class Lease(Protocol):
    """A leader term held by at most one replica at a time, with an epoch that only grows."""

    def is_leader(self) -> bool:
        """Whether this replica holds the term now (as far as it can tell locally)."""
        ...

    @property
    def epoch(self) -> int | None:
        """The epoch of our term (None when not leader)."""
        ...

    async def run_once(self) -> None:
        """One iteration: keep the term if held, else try to take it; never raises on store
        errors (they mean "not leader")."""
        ...

    async def release(self) -> bool:
        """Give the term up so another replica need not wait for it to lapse."""
        ...


@runtime_checkable
class FencedOwnership(Protocol):
    """One owner per resource; each acquisition yields a fence above every earlier one."""

    async def acquire_fenced(self, resource: str) -> int:
        """Own ``resource`` and return a fence strictly above every fence issued for it before
        (raises when another owner holds it and cannot be displaced)."""
        ...

    async def release_resource(self, resource: str) -> None:
        """Let ``resource`` go (a no-op when not held)."""
        ...


@runtime_checkable
class FenceCheck(Protocol):
    """A store that applies a write only when its fence is not below the newest it has seen."""

    async def check_fence(self, resource: str, fence: int) -> bool:
        """Whether a write carrying ``fence`` would be accepted for ``resource`` now."""
        ...


@runtime_checkable
class ChangelogWriter(Protocol):
    """A replayable changelog: numbered entries, readers detect gaps."""

    async def append(self, origin: str, fields: Mapping[str, str]) -> str:
        """Append one entry; returns its id."""
        ...
