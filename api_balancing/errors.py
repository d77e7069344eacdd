"""Foghorn's errors, and their gRPC status in one place.

Domain code raises these (no grpc import there); the wire layer maps them with ``grpc_code``.
Every message names the field or node it is about.
"""

from __future__ import annotations


class FoghornError(Exception):
    """Base error; ``code`` is the gRPC status name."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class InvalidArgument(FoghornError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field)


class TooLarge(FoghornError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field)


class NotFound(FoghornError):
    code = "NOT_FOUND"


class FailedPrecondition(FoghornError):
    code = "FAILED_PRECONDITION"


class NoEligibleNode(FoghornError):
    code = "RESOURCE_EXHAUSTED"


class CommandTimeout(FoghornError):
    code = "DEADLINE_EXCEEDED"


class PermissionDenied(FoghornError):
    code = "PERMISSION_DENIED"


class RateLimited(FoghornError):
    """Too many calls from one address; ``retry_after_s`` is when the next one is allowed."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
