"""A replayable, bounded changelog over one Redis Stream, with gap detection.

Writers append entries (``XADD ... MAXLEN``) carrying their ``origin`` and a sequence number
``n`` taken from a counter (``<key>:seq``) in the same atomic script as the XADD, so ``n`` is
contiguous in stream order. Readers keep a cursor (the last entry they consumed: its ID and its
``n``) and read what follows. Pub/sub would lose what a reader misses while disconnected; a
stream lets it replay, and the sequence tells it when replay is impossible:

- the next entry's ``n`` is not ``cursor.n + 1``: entries after the cursor were trimmed (the
  reader fell more than ``maxlen`` behind), or Redis lost the stream and its counter (restart
  without persistence: ``n`` starts again at 1);
- the connection broke: we cannot prove nothing was lost meanwhile (a Redis restart loses
  entries nobody will ever number again), so the next successful read reports a gap.

Each case raises ``GapDetected``; the owner of the reader then takes the tail position, rebuilds
its state from a snapshot and resumes from that tail (tail-first), so nothing written during the
snapshot is missed. The check costs nothing extra on the wire: no round trip beyond the
blocking ``XREAD`` itself. Scripts writing to the stream (``fencing.Announce``) must append
through ``APPEND_LUA`` so every entry is numbered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError

ORIGIN_FIELD = "origin"
SEQ_FIELD = "n"
# Field names as a raw (undecoded) reply carries them, and as text for other clients' replies.
_SEQ_NAMES = (SEQ_FIELD.encode(), SEQ_FIELD)
_ORIGIN_NAMES = (ORIGIN_FIELD.encode(), ORIGIN_FIELD)
START = "0-0"

# Lua body appending one numbered entry: stream KEYS[s], counter KEYS[c], then XADD.
# Used by Changelog.append and embedded in other scripts (fenced writes).
APPEND_LUA = """
local function changelog_append(stream, counter, maxlen, exact, fields)
  local n = redis.call('INCR', counter)
  local trim = '~'
  if exact then trim = '=' end
  local xadd = {stream, 'MAXLEN', trim, maxlen, '*', 'n', n}
  for i = 1, #fields do xadd[#xadd + 1] = fields[i] end
  return redis.call('XADD', unpack(xadd))
end
"""

_APPEND = (
    APPEND_LUA
    + """
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return changelog_append(KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2] == '1', fields)
"""
)


def seq_key(stream: str) -> str:
    """The counter numbering the entries of ``stream``."""
    return f"{stream}:seq"


def parse_id(entry_id: str) -> tuple[int, int]:
    """Stream IDs compare as (milliseconds, sequence) pairs, not as strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Position:
    """A point in the changelog: the last entry's ID and its sequence number ``n``."""

    id: str = START
    index: int = 0


@dataclass(frozen=True)
class Entry:
    """One changelog entry: its stream ID, who wrote it and its fields."""

    id: str
    origin: str
    fields: Mapping[str, str]


class GapDetected(Exception):
    """The reader cannot prove it saw every entry after its cursor; rebuild from a snapshot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Changelog:
    """The writer side and the factory of readers for one stream key."""

    def __init__(
        self, redis: aioredis.Redis, key: str, maxlen: int = 10_000, exact_trim: bool = False
    ) -> None:
        if maxlen <= 0:
            raise ValueError("maxlen must be positive")
        self._redis = redis
        self.key = key
        self.seq_key = seq_key(key)
        self.maxlen = maxlen
        # Approximate trimming ('~') is cheaper but keeps up to one stream node (100 entries)
        # above the bound; exact trimming makes small bounds (tests) behave exactly.
        self.exact_trim = exact_trim
        self._append = redis.register_script(_APPEND)

    async def append(self, origin: str, fields: Mapping[str, str]) -> str:
        """Append a numbered entry and return its ID."""
        args: list[Any] = [str(self.maxlen), "1" if self.exact_trim else "0", ORIGIN_FIELD, origin]
        for key, value in fields.items():
            args.extend((key, value))
        return _text(await self._append(keys=[self.key, self.seq_key], args=args))

    async def tail(self) -> Position:
        """The position of the last entry (``Position()`` when the stream is empty or missing).

        Taken before a snapshot, it is where replay resumes after the snapshot (tail-first).
        """
        return _tail_position(await self._redis.xrevrange(self.key, "+", "-", count=1))

    def reader(
        self, cursor: Position | None = None, skip_origin: str | None = None
    ) -> ChangelogReader:
        """A reader positioned after ``cursor`` that drops entries written by ``skip_origin``."""
        return ChangelogReader(self._redis, self.key, cursor or Position(), skip_origin)


def _raw_reply(response: Any, **_options: Any) -> Any:
    return response


class _XRead:
    """The ``XREAD`` both readers share: on a client of its own over the caller's pool, with
    the reply left as Redis sent it (flat field lists: redis-py's parser would build a dict per
    entry, skipped ones included), and a connection error remembered, so that the next good
    read reports a gap instead of pretending nothing was missed."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = aioredis.Redis(connection_pool=redis.connection_pool)
        self._redis.set_response_callback("XREAD", _raw_reply)
        self._broken = False  # a connection error happened since the last good read

    async def _xread(self, keys: list[str], ids: list[str], block_ms: int, count: int) -> Any:
        try:
            # NEVER_DECODE: the reply stays bytes whatever the client's decoding, so entries a
            # reader skips cost no text decoding; only the entries kept are decoded.
            reply = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", *keys, *ids,
                **{NEVER_DECODE: True},
            )  # fmt: skip
        except (RedisError, OSError):
            self._broken = True
            raise
        if self._broken:
            self._broken = False
            raise GapDetected("connection to Redis was lost")
        return reply


class ChangelogReader(_XRead):
    """Reads entries after a cursor, raising ``GapDetected`` when replay cannot be complete.

    Every entry is read (the sequence check needs them all) but entries written by
    ``skip_origin`` are dropped before anything is built for them: writers put ``origin`` right
    after ``n``, so the reader compares two strings of the flat reply and moves on. A replica
    reading its own writes back (half of all entries with two replicas, all of them alone) would
    otherwise parse every record it wrote only to throw it away.
    """

    def __init__(
        self, redis: aioredis.Redis, key: str, cursor: Position, skip_origin: str | None
    ) -> None:
        super().__init__(redis)
        self.key = key
        self.position = cursor
        self.skip_origin = skip_origin
        self._skip_raw = skip_origin.encode() if skip_origin is not None else None

    @property
    def cursor(self) -> str:
        return self.position.id

    def reset(self, cursor: Position) -> None:
        """Resume after ``cursor`` (typically the tail taken before a rehydration snapshot)."""
        self.position = cursor
        self._broken = False

    async def read(self, block_ms: int = 1000, count: int = 1000) -> list[Entry]:
        """Entries after the cursor (waiting up to ``block_ms``); advances the cursor.

        Raises ``GapDetected`` when entries may have been lost (nothing of that batch is
        returned), and lets connection errors through (after which the next successful read
        reports a gap).
        """
        reply = await self._xread([self.key], [self.position.id], block_ms, count)
        entries: list[Entry] = []
        self.position = _parse(
            self.key, self.position, _messages(reply), self._skip_raw, entries, self.skip_origin
        )
        return entries


class ChangelogSet(_XRead):
    """Several changelog streams read as one, each with its own cursor and gap check.

    For one stream per writer: a writer appends only to its own stream (``Changelog`` or any
    ``APPEND_LUA`` script on that key) and reads only the others', so it never receives its own
    entries at all. Entries come back grouped by stream, each stream in order; nothing orders
    entries of different streams (writers' state must be ordered by their own tokens anyway).

    Streams join by ``add`` (from a registry the caller keeps, e.g. a Redis set). A ``watch``
    stream, read along in the same ``XREAD``, carries no changelog entries, only wake-ups: any
    entry there sets ``watch_fired`` so the caller re-reads its registry (a writer announces
    its new stream there before its first write). The watch stream is not gap-checked: whatever
    is missed there, the next entry makes the caller look at the registry as a whole.
    """

    def __init__(self, redis: aioredis.Redis, watch: str | None = None) -> None:
        super().__init__(redis)
        self.positions: dict[str, Position] = {}
        self.watch = watch
        self.watch_cursor = START
        self.watch_fired = False

    def add(self, key: str, position: Position | None = None) -> bool:
        """Read ``key`` from after ``position`` (from its start by default: a stream first seen
        must begin at entry 1, or it raises ``GapDetected``). False when already read."""
        if key in self.positions:
            return False
        self.positions[key] = position or Position()
        return True

    def reset(self, positions: dict[str, Position], watch_cursor: str = START) -> None:
        """Read exactly these streams from after these positions (tails taken before a
        rehydration snapshot), and the watch stream after ``watch_cursor``."""
        self.positions = dict(positions)
        self.watch_cursor = watch_cursor
        self.watch_fired = False
        self._broken = False

    async def read(self, block_ms: int = 1000, count: int = 1000) -> list[Entry]:
        """Entries after every stream's cursor (waiting up to ``block_ms``); advances cursors.

        Raises ``GapDetected`` when a stream's next entry is not the one after its cursor, or
        after a connection error (nothing of that read is returned); connection errors pass
        through.
        """
        keys = list(self.positions)
        ids = [self.positions[k].id for k in keys]
        if self.watch is not None:
            keys.append(self.watch)
            ids.append(self.watch_cursor)
        if not keys:
            raise ValueError("nothing to read: no stream and no watch stream")
        reply = await self._xread(keys, ids, block_ms, count)
        entries: list[Entry] = []
        advanced: dict[str, Position] = {}
        for raw_key, messages in _streams(reply):
            key = _text(raw_key)
            if key == self.watch:
                if messages:
                    self.watch_cursor = _text(messages[-1][0])
                    self.watch_fired = True
                continue
            position = self.positions.get(key)
            if position is None:
                continue
            advanced[key] = _parse(key, position, messages, None, entries)
        self.positions.update(advanced)
        return entries

    @staticmethod
    async def tails(redis: aioredis.Redis, keys: list[str]) -> dict[str, Position]:
        """The tail position of each stream (``Position()`` when empty or missing), in one
        round trip: taken before a snapshot, where replay resumes after it."""
        if not keys:
            return {}
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.xrevrange(key, "+", "-", count=1)
        out: dict[str, Position] = {}
        for key, last in zip(keys, await pipe.execute(), strict=True):
            out[key] = _tail_position(last)
        return out


def _tail_position(last: Any) -> Position:
    if not last:
        return Position()
    entry_id, fields = last[0]
    fields = fields or {}
    # field names are bytes on a client that does not decode replies
    n = fields.get(SEQ_FIELD, fields.get(_SEQ_NAMES[0], 0))
    return Position(_text(entry_id), int(_text(n)))


def _parse(
    key: str,
    position: Position,
    messages: Any,
    skip: bytes | None,
    entries: list[Entry],
    skip_origin: str | None = None,
) -> Position:
    """Check and decode one stream's raw messages after ``position`` into ``entries``
    (dropping those from ``skip``); returns the new position or raises ``GapDetected``."""
    expected = position.index + 1
    last_id: bytes | str = ""
    for raw_id, flat in messages:
        # An entry not written through APPEND_LUA (no n first) cannot be placed: n = 0.
        n = int(flat[1] or 0) if len(flat) >= 2 and flat[0] in _SEQ_NAMES else 0
        if n != expected:
            why = "trimmed past the cursor" if n > expected else "restarted (Redis lost it)"
            raise GapDetected(
                f"changelog {key} {why}: expected entry {expected} after {position.id}, "
                f"got {n} ({_text(raw_id)})"
            )
        expected += 1
        last_id = raw_id
        if skip is not None and len(flat) >= 4 and flat[3] == skip and flat[2] in _ORIGIN_NAMES:
            continue
        text = [_text(v) for v in flat]
        fields = dict(zip(text[2::2], text[3::2], strict=False))
        origin = fields.pop(ORIGIN_FIELD, "")
        if skip_origin is not None and origin == skip_origin:
            continue
        entries.append(Entry(id=_text(raw_id), origin=origin, fields=fields))
    if not last_id:
        return position
    return Position(_text(last_id), expected - 1)


def _streams(reply: Any) -> list[tuple[Any, Any]]:
    """``(stream, messages)`` pairs of a raw XREAD reply."""
    if not reply:
        return []
    # RESP3 answers a map {stream: messages}, RESP2 a list of [stream, messages] pairs.
    if isinstance(reply, dict):
        return list(reply.items())
    return [(pair[0], pair[1]) for pair in reply]


def _messages(reply: Any) -> list[Any]:
    """The ``[id, [field, value, ...]]`` messages of a raw XREAD reply of one stream."""
    if not reply:
        return []
    # RESP3 answers a map {stream: messages}, RESP2 a list of [stream, messages] pairs.
    streams = reply.values() if isinstance(reply, dict) else [pair[1] for pair in reply]
    return [message for messages in streams for message in messages]
