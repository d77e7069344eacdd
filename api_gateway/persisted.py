"""Automatic persisted queries: Apollo's APQ protocol, so clients may send a hash, not the query.

A request carries ``extensions.persistedQuery = {"version": 1, "sha256Hash": "<hex>"}``:

- hash only: the query registered under that hash runs; an unknown hash is answered with the
  GraphQL error ``PersistedQueryNotFound`` (``extensions.code`` ``PERSISTED_QUERY_NOT_FOUND``,
  HTTP 200, not cacheable), upon which Apollo's clients send the query with its hash;
- query and hash: the hash must be the SHA-256 of the query text (else 400, nothing stored);
  the query is registered and runs.

Requests without ``persistedQuery`` pass through untouched. The registry is per process, a
bounded LRU of query texts (a client that meets another replica re-registers once, as the
protocol intends); parsing and validation of the texts it returns are cached by the schema
(``ParserCache``, ``ValidationCache``), so a hash-only request skips both. No I/O here: the HTTP
view calls ``resolve`` on each parsed request (``api_gateway.http``).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from strawberry.http import GraphQLRequestData

NOT_FOUND_CODE = "PERSISTED_QUERY_NOT_FOUND"
NOT_FOUND_MESSAGE = "PersistedQueryNotFound"
_HASH = re.compile(r"[0-9a-f]{64}")


class PersistedQueryNotFound(Exception):
    """The hash is not registered here: the client must send the query with it."""


class PersistedQueryInvalid(ValueError):
    """A malformed ``persistedQuery`` extension, or a hash that is not the query's (a 400)."""


class PersistedQueries:
    """The registry of one process: at most ``max_entries`` queries, least recently used out."""

    def __init__(self, max_entries: int = 1_000, max_query_bytes: int = 16_384) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.max_query_bytes = max_query_bytes
        self._queries: OrderedDict[str, str] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.registered = 0

    def __len__(self) -> int:
        return len(self._queries)

    def resolve(self, data: GraphQLRequestData) -> GraphQLRequestData:
        """The request with its query text filled in from the registry (or registered).

        Raises ``PersistedQueryNotFound`` for an unknown hash sent alone and
        ``PersistedQueryInvalid`` for a bad extension or a hash that does not match.
        """
        extension = (data.extensions or {}).get("persistedQuery")
        if extension is None:
            return data
        digest = _checked_hash(extension)
        if data.query is None:
            query = self._queries.get(digest)
            if query is None:
                self.misses += 1
                raise PersistedQueryNotFound(digest)
            self._queries.move_to_end(digest)
            self.hits += 1
            return replace(data, query=query)
        if hashlib.sha256(data.query.encode()).hexdigest() != digest:
            raise PersistedQueryInvalid(
                "extensions.persistedQuery.sha256Hash: provided sha does not match query"
            )
        if len(data.query.encode()) <= self.max_query_bytes and digest not in self._queries:
            self._queries[digest] = data.query
            self.registered += 1
            if len(self._queries) > self.max_entries:
                self._queries.popitem(last=False)
        return data

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._queries), "hits": self.hits, "misses": self.misses,
                "registered": self.registered}  # fmt: skip


def _checked_hash(extension: Any) -> str:
    if not isinstance(extension, dict):
        raise PersistedQueryInvalid("extensions.persistedQuery must be an object")
    if extension.get("version") != 1:
        raise PersistedQueryInvalid("extensions.persistedQuery.version: only version 1 exists")
    digest = extension.get("sha256Hash")
    if not isinstance(digest, str) or not _HASH.fullmatch(digest.lower()):
        raise PersistedQueryInvalid(
            "extensions.persistedQuery.sha256Hash must be 64 hexadecimal digits (SHA-256)"
        )
    return digest.lower()


def not_found_body() -> dict[str, Any]:
    """The answer to an unknown hash, in the shape Apollo's clients look for."""
    return {
        "errors": [{"message": NOT_FOUND_MESSAGE, "extensions": {"code": NOT_FOUND_CODE}}],
    }
