"""Pending redirects: viewers Foghorn sent to a node that have not shown up in its reports yet.

Per-replica soft state (never in the shared store): each replica only knows the redirects it
sent. An entry leaves when the node's next reports show that many more viewers of that stream,
or after ``window_s`` (30 s). The count per node feeds the bandwidth penalty in scoring.

Only redirects actually issued to a viewer are recorded (``/play``'s 302, not a RouteViewer
answer, which nobody has to follow), and each client address has at most ``per_client``
entries pending at once: an anonymous flood can move its own share of the penalty, never
enough to make every node ineligible for everyone else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pkg.common.clock import Clock

PendingListener = Callable[[str, int], None]


class RedirectTracker:
    """Counts pending redirects per node, oldest first, with expiry on an injected clock."""

    def __init__(self, clock: Clock, window_s: float = 30.0, per_client: int = 0) -> None:
        self._clock = clock
        self.window_s = window_s
        self.per_client = per_client  # 0: no cap (unit tests of the accounting alone)
        self._timeline: deque[tuple[float, str, str]] = deque()
        # (node, stream) -> pending entries, oldest first: (time, client address key)
        self._by_key: dict[tuple[str, str], deque[tuple[float, str]]] = {}
        self._by_client: dict[str, int] = {}
        self.capped = 0  # redirects not counted because their client was at its cap
        self._streams_of: dict[str, set[str]] = {}  # node -> streams with pending entries
        self._per_node: dict[str, int] = {}
        self._listeners: list[PendingListener] = []

    def add_listener(self, listener: PendingListener) -> None:
        self._listeners.append(listener)

    def pending(self, node_id: str) -> int:
        return self._per_node.get(node_id, 0)

    def record(self, node_id: str, stream_id: str, client: str = "") -> bool:
        """A viewer of ``stream_id`` (from address key ``client``) was just sent to
        ``node_id``. False (not counted) when that client is at its cap."""
        if self.per_client and self._by_client.get(client, 0) >= self.per_client:
            self.capped += 1
            return False
        now = self._clock.monotonic()
        self._timeline.append((now, node_id, stream_id))
        self._by_key.setdefault((node_id, stream_id), deque()).append((now, client))
        self._by_client[client] = self._by_client.get(client, 0) + 1
        self._streams_of.setdefault(node_id, set()).add(stream_id)
        self._change(node_id, +1)
        return True

    def _settle_client(self, client: str) -> None:
        left = self._by_client.get(client, 0) - 1
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)

    def arrived(self, node_id: str, stream_id: str, count: int) -> None:
        """``count`` more viewers of ``stream_id`` showed up on ``node_id``: settle the oldest."""
        key = (node_id, stream_id)
        entries = self._by_key.get(key)
        if not entries or count <= 0:
            return
        settled = min(count, len(entries))
        for _ in range(settled):
            self._settle_client(entries.popleft()[1])
        if not entries:
            self._drop_key(key)
        self._change(node_id, -settled)

    def forget(self, node_id: str) -> None:
        """Drop everything pending for a node (evicted or reconnected)."""
        for stream_id in self._streams_of.pop(node_id, ()):
            for _, client in self._by_key.pop((node_id, stream_id), ()):
                self._settle_client(client)
        if self._per_node.pop(node_id, 0):
            self._notify(node_id, 0)

    def expire(self) -> None:
        """Drop entries older than the window (cheap: called on every routing decision)."""
        horizon = self._clock.monotonic() - self.window_s
        timeline = self._timeline
        while timeline and timeline[0][0] < horizon:
            t, node_id, stream_id = timeline.popleft()
            key = (node_id, stream_id)
            entries = self._by_key.get(key)
            # Arrivals settle the oldest entries first, so if this entry is still pending it
            # is the oldest of its key; otherwise it was settled already.
            if entries and entries[0][0] <= t:
                self._settle_client(entries.popleft()[1])
                if not entries:
                    self._drop_key(key)
                self._change(node_id, -1)

    def _drop_key(self, key: tuple[str, str]) -> None:
        del self._by_key[key]
        streams = self._streams_of.get(key[0])
        if streams is not None:
            streams.discard(key[1])
            if not streams:
                del self._streams_of[key[0]]

    def _change(self, node_id: str, delta: int) -> None:
        count = self._per_node.get(node_id, 0) + delta
        if count <= 0:
            self._per_node.pop(node_id, None)
            count = 0
        else:
            self._per_node[node_id] = count
        self._notify(node_id, count)

    def _notify(self, node_id: str, count: int) -> None:
        for listener in self._listeners:
            listener(node_id, count)
