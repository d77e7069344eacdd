"""A replayable, bounded changelog over one Redis Stream, with gap detection.

Writers append entries (``XADD ... MAXLEN``) carrying their ``origin``; readers keep a cursor
(the last entry they consumed: its ID and its position in the stream's history, i.e. how many
entries had been added up to it) and read what follows. Pub/sub would lose what a reader misses
while disconnected; a stream lets it replay, and tells it when replay is impossible:

- the stream was trimmed past the cursor: more entries were removed from the head
  (``entries-added - length``) than the reader had consumed, counting only those it is
  receiving in the same read;
- the stream vanished or was recreated (``entries-added`` went down: Redis lost its data);
- the connection broke (we cannot prove nothing was lost meanwhile, e.g. a Redis restart).

Each case raises ``GapDetected``; the owner of the reader then takes the tail position, rebuilds
its state from a snapshot and resumes from that tail (tail-first), so nothing written during the
snapshot is missed. The check costs no extra round trip: ``XINFO STREAM`` is pipelined right
behind the blocking ``XREAD`` and answers as soon as it returns. Entries are never ``XDEL``-ed
(only trimmed), which is what makes the count exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

ORIGIN_FIELD = "origin"
START = "0-0"


def parse_id(entry_id: str) -> tuple[int, int]:
    """Stream IDs compare as (milliseconds, sequence) pairs, not as strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Entry:
    """One changelog entry: its stream ID, who wrote it and its fields."""

    id: str
    origin: str
    fields: Mapping[str, str]


@dataclass(frozen=True)
class Position:
    """A point in the changelog: the last entry ID and how many entries were added up to it."""

    id: str = START
    index: int = 0


class GapDetected(Exception):
    """The reader cannot prove it saw every entry after its cursor; rebuild from a snapshot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_map(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return {_text(k): v for k, v in raw.items()}
    items = list(raw)
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


class Changelog:
    """The writer side and the factory of readers for one stream key."""

    def __init__(
        self, redis: aioredis.Redis, key: str, maxlen: int = 10_000, exact_trim: bool = False
    ) -> None:
        if maxlen <= 0:
            raise ValueError("maxlen must be positive")
        self._redis = redis
        self.key = key
        self.maxlen = maxlen
        # Approximate trimming ('~') is cheaper but keeps up to one stream node (100 entries)
        # above the bound; exact trimming makes small bounds (tests) behave exactly.
        self.exact_trim = exact_trim

    async def append(self, origin: str, fields: Mapping[str, str]) -> str:
        """Append an entry and return its ID."""
        entry: dict[Any, Any] = {ORIGIN_FIELD: origin, **fields}
        entry_id = await self._redis.xadd(
            self.key, entry, maxlen=self.maxlen, approximate=not self.exact_trim
        )
        return _text(entry_id)

    async def tail(self) -> Position:
        """The position after the last entry (``Position()`` when the stream is missing).

        Taken before a snapshot, it is where replay resumes after the snapshot (tail-first).
        """
        try:
            info = _info_map(await self._redis.xinfo_stream(self.key))
        except ResponseError:
            return Position()
        return Position(_text(info["last-generated-id"]), int(info["entries-added"]))

    def reader(
        self, cursor: Position | None = None, skip_origin: str | None = None
    ) -> ChangelogReader:
        """A reader positioned after ``cursor`` that drops entries written by ``skip_origin``."""
        return ChangelogReader(self._redis, self.key, cursor or Position(), skip_origin)


class ChangelogReader:
    """Reads entries after a cursor, raising ``GapDetected`` when replay cannot be complete."""

    def __init__(
        self, redis: aioredis.Redis, key: str, cursor: Position, skip_origin: str | None
    ) -> None:
        self._redis = redis
        self.key = key
        self.position = cursor
        self.skip_origin = skip_origin
        self._entries_added: int | None = None
        self._broken = False  # a connection error happened since the last good read

    @property
    def cursor(self) -> str:
        return self.position.id

    def reset(self, cursor: Position) -> None:
        """Resume after ``cursor`` (typically the tail taken before a rehydration snapshot)."""
        self.position = cursor
        self._entries_added = None
        self._broken = False

    async def read(self, block_ms: int = 1000, count: int = 1000) -> list[Entry]:
        """Entries after the cursor (waiting up to ``block_ms``); advances the cursor.

        Raises ``GapDetected`` when entries may have been lost, and lets connection errors
        through (after which the next successful read reports a gap).
        """
        pipe = self._redis.pipeline(transaction=False)
        pipe.xread({self.key: self.position.id}, count=count, block=block_ms)
        pipe.xinfo_stream(self.key)
        try:
            reply, info = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError):
            self._broken = True
            raise
        if isinstance(reply, Exception):
            if not isinstance(reply, ResponseError):
                self._broken = True
            raise reply
        if self._broken:
            self._broken = False
            raise GapDetected("connection to Redis was lost")
        batch = self._batch(reply)
        self._check_gap(batch, info)
        entries: list[Entry] = []
        for entry_id, fields in batch:
            origin = fields.pop(ORIGIN_FIELD, "")
            if self.skip_origin is not None and origin == self.skip_origin:
                continue
            entries.append(Entry(id=entry_id, origin=origin, fields=fields))
        if batch:
            self.position = Position(batch[-1][0], self.position.index + len(batch))
        return entries

    def _batch(self, reply: Any) -> list[tuple[str, dict[str, str]]]:
        if not reply:
            return []
        streams = reply.items() if isinstance(reply, dict) else reply
        out: list[tuple[str, dict[str, str]]] = []
        for _key, messages in streams:
            # RESP3 replies wrap messages in a list of one; RESP2 gives them directly.
            seq = messages[0] if messages and isinstance(messages[0], list) else messages
            for entry_id, fields in seq:
                out.append((_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
        return out

    def _check_gap(self, batch: list[tuple[str, dict[str, str]]], info: Any) -> None:
        if isinstance(info, Exception):
            # No such key: fine on a fresh stream, a loss if entries had been added before.
            if self.position.index > 0 or self._entries_added:
                raise GapDetected("changelog stream vanished (Redis lost its data?)")
            return
        data = _info_map(info)
        added = int(data.get("entries-added", 0))
        if added < max(self._entries_added or 0, self.position.index):
            raise GapDetected("changelog stream was recreated (entries-added went down)")
        self._entries_added = added
        removed = added - int(data.get("length", 0))
        if removed <= self.position.index:
            return
        # Entries after our cursor were trimmed. Those we are receiving right now were trimmed
        # after XREAD served them (no loss); any other one is a loss.
        first = data.get("first-entry")
        first_id = parse_id(_text(first[0])) if first else (1 << 62, 0)
        received_then_trimmed = sum(1 for entry_id, _ in batch if parse_id(entry_id) < first_id)
        if removed > self.position.index + received_then_trimmed:
            raise GapDetected(
                f"changelog trimmed past the cursor {self.position.id}: "
                f"{removed - self.position.index - received_then_trimmed} entries lost"
            )
