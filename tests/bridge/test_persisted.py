"""The persisted-query registry on its own: hits, registration, bounds."""

from __future__ import annotations

import hashlib

import pytest
from strawberry.http import GraphQLRequestData

from api_gateway.persisted import PersistedQueries, PersistedQueryInvalid, PersistedQueryNotFound


def request(query: str | None, digest: str | None = None) -> GraphQLRequestData:
    ext = None if digest is None else {"persistedQuery": {"version": 1, "sha256Hash": digest}}
    return GraphQLRequestData(query=query, variables=None, operation_name=None, extensions=ext)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_requests_without_the_extension_pass_through_untouched() -> None:
    plain = request("{ me { tenant } }")
    assert PersistedQueries().resolve(plain) is plain


def test_a_registered_hash_fills_in_its_query_and_unknown_ones_are_not_found() -> None:
    registry = PersistedQueries()
    with pytest.raises(PersistedQueryNotFound):
        registry.resolve(request(None, sha("{ a }")))
    registry.resolve(request("{ a }", sha("{ a }")))
    assert registry.resolve(request(None, sha("{ a }").upper())).query == "{ a }"
    assert registry.stats() == {"entries": 1, "hits": 1, "misses": 1, "registered": 1}


def test_the_registry_keeps_the_most_recently_used_queries_only() -> None:
    registry = PersistedQueries(max_entries=2)
    for text in ("{ a }", "{ b }"):
        registry.resolve(request(text, sha(text)))
    registry.resolve(request(None, sha("{ a }")))  # a is now the most recent
    registry.resolve(request("{ c }", sha("{ c }")))
    assert len(registry) == 2
    assert registry.resolve(request(None, sha("{ a }"))).query == "{ a }"
    with pytest.raises(PersistedQueryNotFound):
        registry.resolve(request(None, sha("{ b }")))


def test_queries_over_the_size_limit_run_but_are_not_kept() -> None:
    registry = PersistedQueries(max_query_bytes=10)
    big = "{ " + "a " * 20 + "}"
    assert registry.resolve(request(big, sha(big))).query == big
    assert len(registry) == 0


def test_a_hash_that_is_not_the_querys_is_refused() -> None:
    with pytest.raises(PersistedQueryInvalid, match="does not match"):
        PersistedQueries().resolve(request("{ a }", sha("{ b }")))
