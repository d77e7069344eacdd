"""The one gRPC server helper: an asyncio server with health, reflection and size limits.

Every service builds its server here so that all of them expose the standard
``grpc.health.v1.Health`` service (per-service status following the service's health report,
NOT_SERVING from the first moment of a stop) and server reflection, and share message-size
limits and keepalive enforcement. The listening port is added in one place (``_listen``): TLS
(mTLS with client authentication) when the settings carry a certificate (``pkg.common.tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from pkg.common import tracing
from pkg.common.health import HealthSource
from pkg.common.shedding import LoadShedder, SheddingPolicy
from pkg.common.tls import PLAINTEXT, TlsSettings, grpc_server_credentials

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Calls that have arrived but that the asyncio server has not picked up yet. grpc core's
# default backlog (1,000, cancelling at random above it and every call above 3,000) cancels a
# herd: a fleet reconnecting at once, or a burst of subscribes, opens thousands of streams
# faster than one Python thread accepts them. The client saw those as INTERNAL "Internal
# error from Core" (its first write failed on the cancelled stream). Load is shed where the
# application can see it instead (handlers, the load-shedding interceptor).
DEFAULT_MAX_PENDING_CALLS = 20_000


@dataclass(frozen=True)
class GrpcSettings:
    """Where and how a service's gRPC server listens (``port`` 0 picks a free port)."""

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls: TlsSettings = PLAINTEXT  # PLATFORM_TLS_*: TLS when it has a certificate
    # A second, plaintext listener beside the TLS one (-1: none): "accept both" while callers
    # move to TLS during a rollout (docs/tls.md).
    plaintext_port: int = -1


@dataclass
class ServiceBinding:
    """One servicer to mount: ``add(servicer, server)`` is the generated ``add_*_to_server``."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # e.g. "foghorn.v1.NodeControl", used by health and reflection


@dataclass
class GrpcServer:
    """A started (or startable) server and its health servicer."""

    server: grpc.aio.Server
    health: HealthServicer
    port: int
    services: list[str] = field(default_factory=list)
    tls: str = "plaintext"  # plaintext | tls | mtls
    plaintext_port: int = -1  # the plaintext listener beside a TLS one (-1: none)

    async def start(self) -> None:
        await self.server.start()
        for name in [*self.services, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in [*self.services, ""]:
            await self.health.set(name, status)

    async def follow(self, report: HealthSource, every_s: float = 0.5) -> None:
        """Keep gRPC health in step with the service's report (run as a background task):
        SERVING unless the report says not_serving."""
        serving: bool | None = None
        while True:
            now = report().serving
            if now != serving:
                await self.set_serving(now)
                serving = now
            await asyncio.sleep(every_s)

    async def stop(self, grace: float = 2.0) -> None:
        """Tell health checkers first, then drain in-flight calls for ``grace`` seconds."""
        with contextlib.suppress(Exception):  # already shut down: nothing to tell
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def build_server(
    bindings: Sequence[ServiceBinding],
    port: int = 0,
    host: str = "127.0.0.1",
    interceptors: Iterable[grpc.aio.ServerInterceptor[Any, Any]] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
    extra_options: Sequence[tuple[str, Any]] = (),
    settings: GrpcSettings | None = None,
    shedding: SheddingPolicy | None = None,
) -> GrpcServer:
    """Create an asyncio gRPC server listening on ``host:port`` (0 picks a free port);
    ``settings``, when given, replaces ``host``, ``port`` and ``max_message_bytes`` and gives
    the transport security (plaintext without it); ``shedding`` bounds each unary method's
    in-flight queue (``pkg.common.shedding``)."""
    tls = PLAINTEXT
    plaintext_port = -1
    if settings is not None:
        host, port, max_message_bytes = settings.host, settings.port, settings.max_message_bytes
        tls, plaintext_port = settings.tls, settings.plaintext_port
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Accept client keepalive pings every 10 s even without active calls (more than
        # grpc's defaults of 5 min and only during calls, which pkg.clients' defaults respect),
        # so a caller may configure faster keepalive for our servers without GOAWAYs.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending_calls),
        *extra_options,
    ]
    # Tracing (when on) is outermost: the server span covers the other interceptors too; then
    # load shedding, so a refused call costs no more than the refusal.
    shedder = [LoadShedder(shedding)] if shedding is None or shedding.enabled else []
    chain = [*tracing.server_interceptors(), *shedder, *interceptors]
    server = grpc.aio.server(interceptors=chain, options=options)
    names = []
    for binding in bindings:
        binding.add(binding.servicer, server)
        names.append(binding.full_name)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    _enable_reflection(server, [*names, health_name])
    bound = _listen(server, host, port, tls)
    extra = -1
    if plaintext_port >= 0 and tls.serves_tls:
        extra = _listen(server, host, plaintext_port)
    return GrpcServer(
        server=server,
        health=health_servicer,
        port=bound,
        services=names,
        tls=tls.describe(),
        plaintext_port=extra,
    )


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio's health servicer plus ``List`` (the whole health map in one call) and a
    NOT_FOUND that says which services this server does report on."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            known = ", ".join(repr(n) for n in sorted(self._server_status)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {request.service[:200]!r}; this server reports "
                f"on: {known} ('' is the whole server)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Server reflection under both names clients ask for: ``grpc.reflection.v1`` (current
    clients try it first) and ``v1alpha`` (older ones). The two protocols are the same messages
    under two package names, so one servicer answers both; the v1 descriptors are registered
    so that clients can describe the v1 service too."""
    _register_reflection_v1_descriptor()
    servicer = reflection_aio.ReflectionServicer([*names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


def _register_reflection_v1_descriptor() -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to the default pool: v1alpha's file with the
    package renamed (grpcio-reflection ships only v1alpha's)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name:
                fld.type_name = fld.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def _listen(server: grpc.aio.Server, host: str, port: int, tls: TlsSettings = PLAINTEXT) -> int:
    """Add the listening port; the one place a service's gRPC transport is chosen: TLS (client
    certificates required with ``client_auth=require``) when ``tls`` has a certificate, else
    plaintext."""
    credentials = grpc_server_credentials(tls)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    return bound
