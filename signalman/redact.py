"""Redaction: what must never reach a subscriber (secrets, full viewer addresses)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(
    r"(pass(word)?|secret|token|authorization|api[_-]?key|private[_-]?key|credential|cookie)",
    re.IGNORECASE,
)
_IP_KEY = re.compile(r"(^|_)(ip|addr|address)$", re.IGNORECASE)
MAX_DEPTH = 8


def _mask_ip(value: str) -> str:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return value
    prefix = 24 if addr.version == 4 else 48
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    return str(net)


def redact(data: Any, depth: int = 0) -> Any:
    """A copy of ``data`` with secret-looking keys replaced and IP addresses truncated."""
    if depth > MAX_DEPTH:
        return REDACTED
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            k = str(key)
            if _SECRET_KEY.search(k):
                out[k] = REDACTED
            elif _IP_KEY.search(k) and isinstance(value, str):
                out[k] = _mask_ip(value)
            else:
                out[k] = redact(value, depth + 1)
        return out
    if isinstance(data, list):
        return [redact(item, depth + 1) for item in data]
    return data
