"""The listener settings Foghorn and Signalman share: one gRPC server (with an optional plaintext
twin during a TLS rollout) and an optional HTTP side, on one host, with one TLS configuration.

A mixin for a service's frozen settings dataclass, which declares the fields itself (so their
defaults and the environment variables' prefix stay the service's own) and calls
``check_listeners`` from its ``__post_init__``.
"""

from __future__ import annotations

from pkg.common.grpcserver import GrpcSettings
from pkg.common.httpserver import HttpSettings
from pkg.common.tls import TlsSettings


class GrpcServiceListeners:
    host: str
    grpc_port: int
    http_port: int  # 0 picks a free port; -1 disables the HTTP side
    max_message_bytes: int
    tls: TlsSettings
    grpc_plaintext_port: int  # -1: none

    def check_listeners(self, env_prefix: str) -> None:
        """Raise ``ValueError`` naming the bad listener setting."""
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port ({env_prefix}GRPC_PORT) out of range: {self.grpc_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port ({env_prefix}HTTP_PORT) out of range: {self.http_port}")
        if not -1 <= self.grpc_plaintext_port <= 65535:
            raise ValueError(
                f"grpc_plaintext_port ({env_prefix}GRPC_PLAINTEXT_PORT) out of range: "
                f"{self.grpc_plaintext_port}"
            )
        if self.grpc_plaintext_port >= 0 and not self.tls.serves_tls:
            raise ValueError(
                f"grpc_plaintext_port ({env_prefix}GRPC_PLAINTEXT_PORT) is the plaintext listener "
                "beside a TLS one: set PLATFORM_TLS_CERT / PLATFORM_TLS_KEY too"
            )
        if self.max_message_bytes < 1024:
            raise ValueError(
                f"max_message_bytes ({env_prefix}MAX_MESSAGE_BYTES) must be >= 1024, "
                f"got {self.max_message_bytes}"
            )

    @property
    def grpc(self) -> GrpcSettings:
        return GrpcSettings(
            self.host, self.grpc_port, self.max_message_bytes, self.tls, self.grpc_plaintext_port
        )

    @property
    def http(self) -> HttpSettings | None:
        """The HTTP side's listener, or None when ``http_port`` is -1."""
        if self.http_port < 0:
            return None
        return HttpSettings(self.host, self.http_port, tls=self.tls)
