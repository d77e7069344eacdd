"""How many node streams a replica hands to which peer so the fleet splits evenly (pure logic).

A replica that joins (or comes back from a restart) owns no node: nothing else would ever move
nodes to it until another replica dies, and then the whole fleet moves at once. Each replica
therefore compares what it owns with an even split of the connected fleet over the live replicas
and, when it holds more than its share, asks a few of its nodes at a time to reconnect to the
peers that hold less (``Reconnect`` on the control stream). The records of moving nodes stay
connected, so routing never misses them.

Moves already asked for but not yet seen at their target count as done, so a replica does not
ask again for the same shortfall while the first nodes are still moving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def plan(me: str, owned: Mapping[str, int], batch: int) -> dict[str, int]:
    """How many of ``me``'s nodes go to each peer now (empty: nothing to move).

    ``owned`` holds every live replica (``me`` included) with the connected nodes it owns
    (moves in flight already counted at their target). ``me`` moves only what it holds above
    the even split's ceiling, at most ``batch`` nodes, to the peers below its floor (the least
    loaded first, never more than each lacks), then to peers still below the ceiling.
    """
    if me not in owned or len(owned) < 2 or batch <= 0:
        return {}
    total = sum(owned.values())
    ceiling = math.ceil(total / len(owned))
    floor = total // len(owned)
    excess = min(owned[me] - ceiling, batch)
    moves: dict[str, int] = {}
    peers = sorted(((c, p) for p, c in owned.items() if p != me))
    # First up to the floor (every replica holds at least that), then one more each to those
    # at the floor while there is a remainder to place (some replicas hold the ceiling).
    for limit in (floor, ceiling):
        for count, peer in peers:
            have = count + moves.get(peer, 0)
            if excess <= 0:
                break
            if have >= limit:
                continue
            give = min(excess, limit - have)
            moves[peer] = moves.get(peer, 0) + give
            excess -= give
    return moves


def balanced(owned: Mapping[str, int]) -> bool:
    """True when no replica holds more than the even split's ceiling."""
    if not owned:
        return True
    ceiling = math.ceil(sum(owned.values()) / len(owned))
    return max(owned.values()) <= ceiling
