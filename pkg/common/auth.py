"""Platform credentials: roles, the token spec, and the authenticated principal of a call.

Every gRPC service of the platform authenticates a bearer token to a ``Principal`` and then
authorizes the call with its access map (``pkg.common.authz``). Roles (docs/security.md):

- ``operator``: platform operator (node admin, fleet-wide mutations, detailed health, metrics,
  reflection, the SYSTEM event channel).
- ``node``: an edge node's control stream; the credential names the node ids it may register
  (``nodes=``; none given: none) and the tenants whose streams it may report (``tenants=``).
- ``replica``: service-to-service calls between replicas (Foghorn's command relay).
- ``system``: the platform's own event publishing.
- ``tenant-admin``, ``tenant-user``: bound to one tenant (``name@tenant``).

A credential with no role authenticates but may do nothing.

Token spec (``PLATFORM_TOKENS``, ``FOGHORN_TOKENS``): entries separated by commas, each
``TOKEN=NAME[@TENANT][:ROLE[|ROLE...]][;OPTION=VALUE...]`` with the options
``nodes=PATTERN|PATTERN`` (node ids: exact, ``prefix*`` or ``*``), ``tenants=PATTERN|PATTERN``
(same patterns; ``*`` never matches a reserved tenant) and ``streams=N`` (concurrent streams of
this credential, instead of the service's default). Examples::

    ops-secret=ops:operator
    edge-secret=edge-paris:node;nodes=edge-paris-*;tenants=*
    relay-secret=foghorn-relay:replica
    acme-secret=bridge@acme:tenant-user

Tokens with the same NAME are one credential (rotation: add the new token with the same name,
move callers, remove the old one). The principal is put in a context variable that handlers read
with ``current_principal()``; it is never taken from a request message.
"""

from __future__ import annotations

import contextvars
import hmac
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pkg.common.tenant import RESERVED_TENANTS, TenantIdError, check_customer_tenant

OPERATOR = "operator"
NODE = "node"
REPLICA = "replica"
SYSTEM = "system"
TENANT_ADMIN = "tenant-admin"
TENANT_USER = "tenant-user"
PLATFORM_ROLES = frozenset({OPERATOR, NODE, REPLICA, SYSTEM})
TENANT_ROLES = frozenset({TENANT_ADMIN, TENANT_USER})
ROLES = PLATFORM_ROLES | TENANT_ROLES

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PATTERN_RE = re.compile(r"\*|[A-Za-z0-9._:-]{1,128}\*?")
MAX_STREAMS_OPTION = 1_000_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a credential name, a tenant (tenant roles only) and roles.

    ``nodes`` / ``tenants`` are the patterns of a ``node`` credential; ``max_streams`` (0: the
    service's default) caps the streams it may hold open at once.
    """

    name: str
    tenant: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    nodes: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    max_streams: int = 0

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def has_any(self, roles: Iterable[str]) -> bool:
        return any(r in self.roles for r in roles)

    def may_register(self, node_id: str) -> bool:
        """May this credential register (and report for) ``node_id``?"""
        return NODE in self.roles and matches_any(self.nodes, node_id)

    def may_carry(self, tenant: str) -> bool:
        """May this node credential report streams of ``tenant``? Reserved tenants: never."""
        return tenant not in RESERVED_TENANTS and matches_any(self.tenants, tenant)


ANONYMOUS = Principal(name="anonymous")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call being handled (ANONYMOUS on public methods without a token)."""
    return _current.get()


def set_current_principal(principal: Principal) -> None:
    _current.set(principal)


def matches_any(patterns: Iterable[str], value: str) -> bool:
    """``*`` matches anything, ``prefix*`` a prefix, anything else exactly."""
    for pattern in patterns:
        if pattern == "*":
            return True
        if pattern.endswith("*"):
            if value.startswith(pattern[:-1]):
                return True
        elif pattern == value:
            return True
    return False


class TokenSpecError(ValueError):
    """A token entry is malformed; the message names the entry by its principal (never the
    secret itself, which would end up in a log)."""


def _patterns(entry: str, option: str, raw: str) -> tuple[str, ...]:
    items = tuple(p for p in raw.split("|") if p)
    if not items:
        raise TokenSpecError(f"token entry {entry}: {option}= is empty")
    for p in items:
        if not _PATTERN_RE.fullmatch(p):
            raise TokenSpecError(
                f"token entry {entry}: {option}= pattern {p[:40]!r} is not an id, 'prefix*' or '*'"
            )
    return items


def parse_token_entry(raw: str) -> tuple[str, Principal]:
    """One ``TOKEN=NAME[@TENANT][:ROLES][;OPTION=VALUE...]`` entry; raises TokenSpecError."""
    token, sep, rest = raw.partition("=")
    token = token.strip()
    if not sep or not token or any(c.isspace() for c in token):
        raise TokenSpecError(
            "token entry without a name: expected TOKEN=NAME[@TENANT][:ROLES][;OPTION=VALUE]"
        )
    main, *options = rest.split(";")
    who, _, role_text = main.partition(":")
    name, at, tenant = who.partition("@")
    if not _NAME_RE.fullmatch(name):
        raise TokenSpecError(f"token entry {name[:40]!r}: name must be 1..64 of A-Za-z0-9._-")
    label = repr(name)
    roles = frozenset(r.strip() for r in role_text.split("|") if r.strip())
    unknown = sorted(roles - ROLES)
    if unknown:
        hint = (
            " (the old catch-all role 'admin' is gone: give operator, node, replica or system)"
            if "admin" in unknown
            else ""
        )
        raise TokenSpecError(
            f"token entry {label}: unknown role {unknown[0]!r}; roles: "
            f"{', '.join(sorted(ROLES))}{hint}"
        )
    if at:
        try:
            check_customer_tenant(tenant, "tenant")
        except TenantIdError as exc:
            raise TokenSpecError(f"token entry {label}: {exc}") from None
        if not roles & TENANT_ROLES:
            raise TokenSpecError(
                f"token entry {label}: a tenant binding (@{tenant}) needs a tenant role "
                "(tenant-admin or tenant-user)"
            )
    elif roles & TENANT_ROLES:
        raise TokenSpecError(f"token entry {label}: tenant roles need a tenant (NAME@TENANT)")
    nodes: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    streams = 0
    for opt in options:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq:
            raise TokenSpecError(f"token entry {label}: option {key[:20]!r} needs =VALUE")
        if key == "nodes":
            nodes = _patterns(label, key, value)
        elif key == "tenants":
            tenants = _patterns(label, key, value)
        elif key == "streams":
            try:
                streams = int(value)
            except ValueError:
                streams = -1
            if not 1 <= streams <= MAX_STREAMS_OPTION:
                raise TokenSpecError(
                    f"token entry {label}: streams= must be 1..{MAX_STREAMS_OPTION}"
                )
        else:
            raise TokenSpecError(
                f"token entry {label}: unknown option {key[:20]!r} (nodes, tenants, streams)"
            )
    if (nodes or tenants) and NODE not in roles:
        raise TokenSpecError(f"token entry {label}: nodes=/tenants= need the node role")
    return token, Principal(
        name=name,
        tenant=tenant,
        roles=roles,
        nodes=nodes,
        tenants=tenants,
        max_streams=streams,
    )


def parse_tokens(spec: str) -> dict[str, Principal]:
    """Parse comma-separated token entries (see the module docstring).

    Raises ``TokenSpecError`` (a ``ValueError``) naming the bad entry.
    """
    tokens: dict[str, Principal] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        token, principal = parse_token_entry(entry)
        if token in tokens:
            raise TokenSpecError(f"token entry {principal.name!r}: the same token is listed twice")
        tokens[token] = principal
    return tokens


def token_entry(token: str, principal: Principal) -> str:
    """The spec entry of ``principal`` (the inverse of ``parse_token_entry``)."""
    text = f"{token}={principal.name}"
    if principal.tenant:
        text += f"@{principal.tenant}"
    if principal.roles:
        text += ":" + "|".join(sorted(principal.roles))
    if principal.nodes:
        text += ";nodes=" + "|".join(principal.nodes)
    if principal.tenants:
        text += ";tenants=" + "|".join(principal.tenants)
    if principal.max_streams:
        text += f";streams={principal.max_streams}"
    return text


def tokens_from_env(env: Mapping[str, str] | None = None) -> dict[str, Principal]:
    env = os.environ if env is None else env
    return parse_tokens(env.get("PLATFORM_TOKENS", ""))


Authenticator = Callable[[str], Principal | None]


def static_authenticator(tokens: Mapping[str, Principal]) -> Authenticator:
    """Constant-time lookup of a bearer token among known tokens."""
    items = [(known.encode(), principal) for known, principal in tokens.items()]

    def authenticate(token: str) -> Principal | None:
        found: Principal | None = None
        given = token.encode()
        for known, principal in items:
            if hmac.compare_digest(known, given):
                found = principal
        return found

    return authenticate


def bearer_token(header: str | bytes | None) -> str | None:
    """The token of an ``authorization`` value: None when absent, "" when not a bearer token."""
    if header is None:
        return None
    text = header.decode(errors="replace") if isinstance(header, bytes) else str(header)
    scheme, _, token = text.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return ""
