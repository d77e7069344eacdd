"""The one tenant-id syntax of the platform, checked at every entry.

A tenant id is 1..63 characters of lowercase ``a-z``, digits, ``_`` and ``-``, starting with a
letter or digit. It becomes a Kafka record key, a Redis key part, a cache-key part and a JWT
claim, so the alphabet leaves out every separator those use (``:``, ``.``, ``/``, ``{``...) and
upper case (two spellings of one tenant would be two tenants). ``system`` is reserved for the
platform's own events: no customer credential, JWT or load report may name it.

Users: Foghorn (load reports, node credentials), the event envelope (``pkg.events``), Signalman
(credentials, published events) and Bridge (the JWT ``tenant`` claim).
"""

from __future__ import annotations

import re

# fullmatch only: "$" would also accept a trailing newline.
TENANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SYSTEM_TENANT = "system"
RESERVED_TENANTS = frozenset({SYSTEM_TENANT})
SYNTAX = "1..63 of a-z 0-9 _ - starting with a letter or digit"


class TenantIdError(ValueError):
    """A tenant id is malformed or reserved; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def is_tenant_id(value: str) -> bool:
    """Syntax only (``system`` passes: platform events carry it)."""
    return TENANT_ID_RE.fullmatch(value) is not None


def check_tenant_id(value: str, field: str = "tenant") -> str:
    """``value`` if it has the tenant-id syntax, else ``TenantIdError`` naming ``field``."""
    if not value:
        raise TenantIdError(field, "must not be empty")
    if TENANT_ID_RE.fullmatch(value) is None:
        raise TenantIdError(field, f"{value[:64]!r} is not a valid tenant id ({SYNTAX})")
    return value


def check_customer_tenant(value: str, field: str = "tenant") -> str:
    """Like ``check_tenant_id`` and also refuses the reserved platform tenant(s)."""
    check_tenant_id(value, field)
    if value in RESERVED_TENANTS:
        raise TenantIdError(field, f"{value!r} is reserved for platform events")
    return value
