"""The settings every pkg.clients client is built from, checked in one place.

``aio_channel``, ``sync_channel``, ``AsyncHttpClient`` and ``HttpClient`` all take a policy, a
runtime and a bearer token. They are validated here, when the client is built, so a wrong value
raises ``ValueError`` naming the argument instead of failing at call time (or, for a falsy
non-policy such as ``0``, being silently replaced by the default).
"""

from __future__ import annotations

from pkg.clients.policy import Policy
from pkg.clients.runtime import Runtime, default_runtime


class ClientSettings:
    """A checked (policy, runtime, token): ``None`` gets the default (for the runtime: the
    process-wide one), a wrong value is refused."""

    def __init__(self, policy: Policy | None, runtime: Runtime | None, token: str | None) -> None:
        if policy is None:
            policy = Policy()
        elif not isinstance(policy, Policy):
            raise ValueError(f"policy must be a pkg.clients.Policy, got {type(policy).__name__}")
        if runtime is None:
            runtime = default_runtime()
        elif not isinstance(runtime, Runtime):
            raise ValueError(f"runtime must be a pkg.clients.Runtime, got {type(runtime).__name__}")
        self.policy = policy
        self.runtime = runtime
        self.token = checked_token(token)


def checked_token(token: str | None) -> str | None:
    """``token`` if it can be sent as ``authorization: Bearer <token>``; else ``ValueError``.

    gRPC metadata and HTTP header values must be printable ASCII: a token read from a file with
    its trailing newline, or an empty one from an unset variable, is refused here rather than
    by the transport on the first call (or, empty, sent as no token at all).
    """
    if token is None:
        return None
    if (
        not isinstance(token, str)
        or not token
        or token != token.strip()
        or not (token.isascii() and token.isprintable())
    ):
        raise ValueError(
            "token must be a non-empty string of printable ASCII without surrounding spaces, "
            f"got {type(token).__name__} of length {len(token) if isinstance(token, str) else 0}"
        )
    return token
