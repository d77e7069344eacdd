"""Merge rules for a node record coming from another replica (pure: no I/O).

- Per-node state is single-writer: the replica owning the node's control stream writes the
  whole record; a record is applied only if its token ``(owner_fence, version)`` is above the
  local watermark, so a stale owner's late write never rolls fresher state back.
- Identity fields only fill blanks: a newer record with an empty identity field (say a record
  written before the node re-sent its geo) never erases what this replica already knew.
- Fleet totals (nodes, viewers, bandwidth) are derived at read time from the records; nothing
  aggregated is stored or synced.
- Per-replica soft state (pending-redirect penalties, open streams) is never synced.
"""

from __future__ import annotations

import dataclasses

from api_balancing.model import NodeIdentity, NodeRecord, evolve


def token(record: NodeRecord) -> tuple[int, int]:
    """The order of single-writer state: the owner's fence first, then its version."""
    return (record.owner_fence, record.version)


def fill_identity(remote: NodeIdentity, local: NodeIdentity | None) -> NodeIdentity:
    """``remote`` with each blank field filled from ``local``."""
    if local is None:
        return remote
    if remote == local:
        # The usual case (a report rewrote the record, the identity is as it was): keep the
        # object this replica holds, so the fleet index sees the same identity and skips its
        # identity-derived columns, and no copy is made.
        return local
    return dataclasses.replace(
        remote,
        roles=remote.roles or local.roles,
        capabilities=remote.capabilities or local.capabilities,
        base_url=remote.base_url or local.base_url,
        location=remote.location if remote.location is not None else local.location,
        capacity=remote.capacity or local.capacity,
        region=remote.region or local.region,
    )


def merge(local: NodeRecord | None, remote: NodeRecord) -> NodeRecord:
    """The record to keep locally when ``remote`` is newer than ``local``."""
    identity = fill_identity(remote.identity, local.identity if local else None)
    if identity is remote.identity:
        return remote
    return evolve(remote, identity=identity)
