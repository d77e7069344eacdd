"""Mint a development JWT: ``python -m api_gateway.devtoken --tenant demo --roles admin``.

Signs with ``BRIDGE_JWT_HS256_SECRET`` (or ``--secret``) for ``BRIDGE_JWT_ISSUER`` /
``BRIDGE_JWT_AUDIENCE``: the same settings a Bridge replica verifies with. For local use and
demos only; production tokens come from the identity provider.
"""

from __future__ import annotations

import argparse
import sys
import time

import jwt

from api_gateway.config import BridgeConfig
from pkg.common.config import ConfigError, load


def mint(
    secret: str,
    tenant: str,
    roles: list[str],
    issuer: str,
    audience: str,
    ttl_s: float,
    subject: str = "dev",
) -> str:
    """An HS256 token with the claims Bridge reads (tenant, roles) and checks (iss, aud, exp)."""
    claims = {
        "sub": subject,
        "tenant": tenant,
        "roles": roles,
        "iss": issuer,
        "aud": audience,
        "exp": int(time.time() + ttl_s),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api_gateway.devtoken", description=__doc__)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--roles", default="", help="comma-separated, e.g. admin")
    parser.add_argument("--ttl", type=float, default=12 * 3600, help="seconds (default 12 h)")
    parser.add_argument("--secret", help="default: $BRIDGE_JWT_HS256_SECRET")
    args = parser.parse_args(argv)
    try:
        cfg = load(BridgeConfig, "BRIDGE")
    except (ConfigError, ValueError) as exc:
        print(f"devtoken: bad configuration: {exc}", file=sys.stderr)
        return 2
    secret = args.secret or cfg.jwt_hs256_secret
    if not secret:
        print("devtoken: give --secret or set BRIDGE_JWT_HS256_SECRET", file=sys.stderr)
        return 2
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    print(mint(secret, args.tenant, roles, cfg.jwt_issuer, cfg.jwt_audience, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
