"""XFetch: probabilistic early expiration (Vattani, Chierichetti, Lowenstein, VLDB 2015).

A reader refreshes a still-fresh entry early with a probability that grows as expiry nears and
with how long the value took to compute (``delta``), so one reader refreshes ahead of time
instead of every reader missing at once on expiry.
"""

from __future__ import annotations

import math


def should_refresh_early(
    now: float, fresh_until: float, delta: float, beta: float, rand: float
) -> bool:
    """True when this reader should refresh now; ``rand`` is uniform in (0, 1]."""
    if beta <= 0 or delta <= 0:
        return now >= fresh_until
    rand = min(max(rand, 1e-12), 1.0)
    return now - delta * beta * math.log(rand) >= fresh_until
