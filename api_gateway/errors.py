"""Stable error codes (``extensions.code``) and the one place that maps failures onto them."""

from __future__ import annotations

from typing import Any

import structlog
from graphql import GraphQLError
from strawberry.schema.exceptions import CannotGetOperationTypeError

log = structlog.get_logger("bridge.errors")

UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
BAD_USER_INPUT = "BAD_USER_INPUT"
NOT_FOUND = "NOT_FOUND"
RATE_LIMITED = "RATE_LIMITED"
PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
QUERY_TOO_DEEP = "QUERY_TOO_DEEP"
QUERY_TOO_LARGE = "QUERY_TOO_LARGE"
BAD_REQUEST = "BAD_REQUEST"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
NO_ELIGIBLE_NODE = "NO_ELIGIBLE_NODE"
BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
BACKEND_TIMEOUT = "BACKEND_TIMEOUT"
SUBSCRIPTIONS_UNAVAILABLE = "SUBSCRIPTIONS_UNAVAILABLE"
SUBSCRIPTION_LIMIT = "SUBSCRIPTION_LIMIT"
SLOW_SUBSCRIBER = "SLOW_SUBSCRIBER"
NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
OPERATION_NAME_REQUIRED = "OPERATION_NAME_REQUIRED"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
INTERNAL = "INTERNAL_SERVER_ERROR"


class ApiError(GraphQLError):
    """An error a resolver raises on purpose: its message is safe to show, its code is stable."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, extensions={"code": code, **extra})
        self.code = code


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """A GraphQL-shaped body for errors answered before GraphQL runs (401, 406, 413, 429, 400):
    no ``data`` entry, because execution never started (GraphQL spec, "Response Format")."""
    return {"errors": [{"message": message, "extensions": {"code": code, **extra}}]}


def classify(error: GraphQLError) -> str:
    """The code of an error raised by GraphQL itself (parse, validation, variables, limits)."""
    msg = error.message
    if msg.startswith("Must provide operation name"):
        return OPERATION_NAME_REQUIRED
    if "tokens. Parsing aborted" in msg or "aliases found. Allowed" in msg:
        return QUERY_TOO_LARGE
    if msg.startswith("Syntax Error"):
        return PARSE_FAILED
    if "exceeds maximum operation depth" in msg:
        return QUERY_TOO_DEEP
    if msg.startswith("Variable ") or "got invalid value" in msg:
        return BAD_USER_INPUT
    return VALIDATION_FAILED


def format_error(error: GraphQLError) -> dict[str, Any]:
    """A GraphQL error as sent to clients: unexpected failures are masked, never leaked."""
    original = error.original_error
    ext = dict(error.extensions or {})
    if isinstance(original, ApiError):
        ext = {**original.extensions, **ext} if original.extensions else ext
    elif isinstance(original, CannotGetOperationTypeError):
        # An unknown operationName, or a document without an operation: the request is wrong.
        return {
            "message": original.as_http_error_reason(),
            "extensions": {"code": BAD_REQUEST},
        }
    elif original is not None and not isinstance(original, GraphQLError):
        log.error("resolver_failed", error=repr(original), path=error.path)
        return {
            "message": "internal error",
            "path": error.path,
            "extensions": {"code": INTERNAL},
        }
    if "code" not in ext:
        ext["code"] = classify(error)
    out: dict[str, Any] = {"message": error.message, "extensions": ext}
    if error.locations:
        out["locations"] = [{"line": loc.line, "column": loc.column} for loc in error.locations]
    if error.path:
        out["path"] = error.path
    return out
