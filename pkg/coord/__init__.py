"""Coordination primitives over Redis, shared by services that run as several replicas.

Each module does one job and knows nothing about the service using it:

- ``lease``: a leader lease with a fencing epoch (SET NX + TTL, compare-and-set renewal,
  holder-only release, local step-down when renewal is late).
- ``fencing``: fencing-token counters and fenced writes (single, or batched puts announced on
  a changelog) that Redis itself rejects when a newer token has been seen (the only defence
  against a paused process that wakes up).
- ``ownership``: fenced ownership records ``owner|address|fence`` acquired by a Lua
  compare-and-set with a strictly higher fence, refreshed, and deleted only by their holder.
- ``changelog``: a replayable, bounded changelog over a Redis Stream with cursor-based gap
  detection (trimmed past the cursor, stream lost, connection lost); ``ChangelogSet`` reads
  one stream per writer as one (a writer never receives its own entries).
- ``watermark``: per-entity watermarks so a stale change never rolls back fresher state.
- ``scripts``: the compare-and-set Lua scripts (delete / extend only if the value is ours)
  shared by leases, ownership records and replica claims.
"""

from pkg.coord.changelog import (
    Changelog,
    ChangelogReader,
    ChangelogSet,
    Entry,
    GapDetected,
    Position,
)
from pkg.coord.fencing import (
    Announce,
    BatchOutcome,
    FenceCounter,
    FencedHash,
    FencedWriteRejected,
    PutBatch,
    WriteResult,
)
from pkg.coord.lease import LeaderLease, LeaseState
from pkg.coord.ownership import OwnerRecord, Ownership, RefreshOutcome
from pkg.coord.watermark import Watermarks

__all__ = [
    "Announce",
    "BatchOutcome",
    "Changelog",
    "ChangelogReader",
    "ChangelogSet",
    "Entry",
    "FenceCounter",
    "FencedHash",
    "FencedWriteRejected",
    "GapDetected",
    "LeaderLease",
    "LeaseState",
    "OwnerRecord",
    "Ownership",
    "Position",
    "PutBatch",
    "RefreshOutcome",
    "Watermarks",
    "WriteResult",
]
