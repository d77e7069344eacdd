"""The one way the platform's Kafka clients are told where the brokers are and how to reach them.

A bootstrap setting (``FOGHORN_KAFKA_BOOTSTRAP``, ``SIGNALMAN_KAFKA_BOOTSTRAP``) is
``host:port[,host:port]`` for plaintext or ``ssl://host:port[,host:port]`` for TLS (Kafka's
``SSL`` security protocol): brokers verified against ``PLATFORM_TLS_CA`` (the system's CAs when
no bundle is set, as for a managed Kafka with a public certificate), and this process's
``PLATFORM_TLS_CERT`` presented when the broker asks for a client certificate. Every aiokafka
producer, consumer and admin client is built with ``**kafka_options(bootstrap)``.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

from pkg.common.tls import TlsSettings, client_ssl_context, tls_from_env

SSL_SCHEME = "ssl://"


def is_ssl(bootstrap: str) -> bool:
    return bootstrap.strip().lower().startswith(SSL_SCHEME)


def hosts(bootstrap: str) -> str:
    """The ``host:port,...`` part of a bootstrap setting."""
    text = bootstrap.strip()
    return text[len(SSL_SCHEME) :] if is_ssl(text) else text


@functools.lru_cache(maxsize=8)
def _context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = client_ssl_context(tls)
    if ctx is None:  # no CA bundle: the system's CAs, still TLS 1.2+
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def kafka_options(bootstrap: str, tls: TlsSettings | None = None) -> dict[str, Any]:
    """aiokafka's connection arguments for ``bootstrap`` (``tls``: default ``PLATFORM_TLS_*``,
    already checked at the process's start by its settings loader)."""
    if not is_ssl(bootstrap):
        return {"bootstrap_servers": bootstrap}
    return {
        "bootstrap_servers": hosts(bootstrap),
        "security_protocol": "SSL",
        "ssl_context": _context(tls if tls is not None else tls_from_env()),
    }
