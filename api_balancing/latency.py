"""A window of recent durations for p50/p99 figures, with a cumulative histogram beside it.

Used by the fleet (routing decision time) and by the Redis store's sync loop (sync lag); it
lives apart from both so that neither imports the other for it.
"""

from __future__ import annotations

from collections import deque

from pkg.common.metrics import Buckets

# Routing decision time (seconds): the target is p99 < 1 ms, so most buckets lie below it.
ROUTE_LATENCY_BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
)  # fmt: skip


class LatencyWindow:
    """The last N durations (microseconds), for p50/p99 in /health and the benchmark.

    The routing handler fills one with the whole decision (validation, ranking, reply); the
    buckets (``bounds``, seconds) feed the routing-time histogram on /metrics.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        # Every decision since start, for the /metrics histogram (seconds, cumulative).
        self.buckets = Buckets(ROUTE_LATENCY_BOUNDS)

    def add(self, micros: float) -> None:
        self._samples.append(micros)
        self.buckets.observe(micros / 1e6)

    def percentile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def __len__(self) -> int:
        return len(self._samples)

    def clear(self) -> None:
        self._samples.clear()
