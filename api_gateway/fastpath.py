"""The request side of whole-answer caching (``bridge.answers``): which requests may be answered
from a kept answer, and under which key.

A key covers everything a kept answer depends on besides the cache entries it was made from
(whose tag versions the store compares): the caller (name, tenant, roles: ``me`` answers with
them, and the resolvers' scope checks and cache keys follow them), the document (its SHA-256,
the same as an APQ hash), the operation name and the variables. Two requests with the same key
get the same answer from the same entries; requests differing in any of these never share one.

Only a POST with a JSON object body (a query, or an APQ hash) is looked up; everything else
(batches, GET, multipart) takes the full path, with no change. Whether an executed request may
keep its answer is decided during execution (``schema.KeepableAnswers``: a query whose top-level
fields are all cached or caller-only, no errors) and by ``bridge.answers`` (every read fresh).
No I/O here.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pkg.common.auth import Principal

_HASH = re.compile(r"[0-9a-f]{64}")


def document_hash(data: dict[str, Any]) -> str | None:
    """The SHA-256 of the request's document: from its text, or its APQ hash when it sends only
    the hash. None when the request is not one the full path would run as it is (no query, a
    malformed persistedQuery extension, a hash that is not the query's: those get their error
    from the full path)."""
    query = data.get("query")
    extensions = data.get("extensions")
    persisted = extensions.get("persistedQuery") if isinstance(extensions, dict) else None
    if persisted is not None:
        if not isinstance(persisted, dict) or persisted.get("version") != 1:
            return None
        digest = persisted.get("sha256Hash")
        if not isinstance(digest, str):
            return None
        digest = digest.lower()
        if not _HASH.fullmatch(digest):
            return None
        if query is None:
            return digest
        if not isinstance(query, str) or hashlib.sha256(query.encode()).hexdigest() != digest:
            return None
        return digest
    if not isinstance(query, str):
        return None
    return hashlib.sha256(query.encode()).hexdigest()


def answer_key(principal: Principal, data: Any) -> str | None:
    """The key of the answer to ``data`` (a parsed JSON body) for ``principal``, or None when
    the request cannot be answered from a kept answer."""
    if not isinstance(data, dict):
        return None
    digest = document_hash(data)
    if digest is None:
        return None
    operation = data.get("operationName")
    variables = data.get("variables")
    if operation is not None and not isinstance(operation, str):
        return None
    if variables is not None and not isinstance(variables, dict):
        return None
    try:
        parts = json.dumps(
            [
                principal.name,
                principal.tenant,
                sorted(principal.roles),
                digest,
                operation,
                variables or {},
            ],
            separators=(",", ":"),
            sort_keys=True,
        )
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(parts.encode()).hexdigest()


__all__ = ["answer_key", "document_hash"]
