"""JWT bearer authentication: the token gives the caller's tenant and roles.

Checked on every token: signature (HS256 with a shared secret, RS256 with a public key; the
algorithm must be one we hold a key for, so an RS256 key can never verify an HS256 token forged
with the public key as secret), expiry (required), issuer, audience, and a non-empty tenant
claim. No token means anonymous (public queries only); a token that fails any check is refused,
never downgraded to anonymous.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from pkg.common.auth import ANONYMOUS, Principal
from pkg.common.clock import SYSTEM_CLOCK, Clock
from pkg.common.tenant import TenantIdError, check_customer_tenant

TOKEN_EXPIRED = "token expired"


class AuthError(Exception):
    """The credentials are present but unacceptable; the message says why (safe to show)."""

    @property
    def expired(self) -> bool:
        """True when the token was valid but has expired (refresh it), not malformed/forged."""
        return str(self) == TOKEN_EXPIRED


@dataclass(frozen=True)
class JwtSettings:
    hs256_secret: str = ""
    rs256_public_key: str = ""
    issuer: str = "platform"
    audience: str = "bridge"
    leeway_s: float = 5.0
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    max_token_bytes: int = 4096


def load_public_key(inline: str, path: str) -> str:
    """The RS256 public key from the inline PEM or, failing that, the file."""
    if inline.strip():
        return inline.replace("\\n", "\n")
    if path:
        return Path(path).read_text()
    return ""


class JwtAuthenticator:
    """Turns an ``Authorization`` header value into a ``Principal`` or raises ``AuthError``."""

    def __init__(self, settings: JwtSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        self._s = settings
        self._clock = clock
        # Verified tokens, keyed by the whole token (signature included): a repeat costs a dict
        # lookup instead of a signature check. Expiry is still checked on every use.
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._keys: dict[str, Any] = {}
        if settings.hs256_secret:
            self._keys["HS256"] = settings.hs256_secret
        if settings.rs256_public_key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            self._keys["RS256"] = load_pem_public_key(settings.rs256_public_key.encode())

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """ANONYMOUS without a header; a Principal for a valid bearer token; AuthError otherwise."""
        return self.authenticate_until(authorization)[0]

    def authenticate_until(self, authorization: str | None) -> tuple[Principal, float | None]:
        """Like ``authenticate``, with the time (epoch seconds, leeway included) after which the
        token is refused: a WebSocket is closed then unless the client re-authenticates."""
        if authorization is None:
            return ANONYMOUS, None
        if len(authorization) > self._s.max_token_bytes:
            raise AuthError("authorization header too long")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("authorization must be 'Bearer <token>'")
        if not self._keys:
            raise AuthError("this gateway accepts no tokens (no JWT key configured)")
        hit = self._verified.get(token)
        if hit is not None:
            if self._clock.time() < hit[1] + self._s.leeway_s:
                return hit[0], hit[1] + self._s.leeway_s
            del self._verified[token]
            raise AuthError(TOKEN_EXPIRED)
        principal, exp = self._verify(token)
        self._verified[token] = (principal, exp)
        if len(self._verified) > 4096:
            self._verified.popitem(last=False)
        return principal, exp + self._s.leeway_s

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise AuthError(f"token algorithm {alg!r} not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._s.audience,
                issuer=self._s.issuer,
                leeway=self._s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(TOKEN_EXPIRED) from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("token invalid") from None
        tenant = claims.get(self._s.tenant_claim)
        if not isinstance(tenant, str) or not tenant.strip():
            raise AuthError(f"token lacks the {self._s.tenant_claim!r} claim")
        try:  # the platform's one tenant-id syntax; "system" is the platform's own
            check_customer_tenant(tenant, f"claim {self._s.tenant_claim!r}")
        except TenantIdError as exc:
            raise AuthError(f"token {exc}") from None
        roles = claims.get(self._s.roles_claim, [])
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list):
            raise AuthError(f"token claim {self._s.roles_claim!r} must be a list of strings")
        sub = claims.get("sub")
        principal = Principal(
            name=sub if isinstance(sub, str) and sub else "user",
            tenant=tenant.strip(),
            roles=frozenset(_strings(roles)),
        )
        return principal, float(claims["exp"])


def _strings(values: Iterable[Any]) -> Iterable[str]:
    return (v for v in values if isinstance(v, str) and v)


def is_anonymous(principal: Principal) -> bool:
    return principal is ANONYMOUS or not principal.tenant
