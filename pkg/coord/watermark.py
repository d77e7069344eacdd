"""Per-entity watermarks: apply a change only when its ordering token is newer than the last.

Changelog entry IDs order by append time, not by who was entitled to write: a stale owner's
write appended late still gets a higher ID. Single-writer state is therefore ordered by a
token the writer carries (its fencing token, then its own sequence number), and a change whose
token is not strictly above the entity's watermark is dropped.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

Token = tuple[int, ...]
"""An ordering token compared lexicographically, e.g. ``(fence, sequence)``."""


class Watermarks(Generic[K]):
    """The highest token applied per entity (in memory; rebuilt on rehydration)."""

    def __init__(self) -> None:
        self._marks: dict[K, Token] = {}

    def get(self, entity: K) -> Token | None:
        """The watermark of ``entity`` or None when nothing was applied yet."""
        return self._marks.get(entity)

    def is_newer(self, entity: K, token: Token) -> bool:
        """True when ``token`` is strictly above the entity's watermark (or it has none)."""
        mark = self._marks.get(entity)
        return mark is None or token > mark

    def advance(self, entity: K, token: Token) -> bool:
        """Raise the watermark to ``token`` if it is newer; return whether it was."""
        if not self.is_newer(entity, token):
            return False
        self._marks[entity] = token
        return True

    def forget(self, entity: K) -> None:
        """Drop an entity's watermark (the entity was removed everywhere)."""
        self._marks.pop(entity, None)

    def clear(self) -> None:
        self._marks.clear()

    def __len__(self) -> int:
        return len(self._marks)
