"""gRPC as standard clients expect it: server reflection (v1 and v1alpha) driving a generic
client (``grpc-requests``), and the standard health stub (Check, Watch, List) from
grpcio-health-checking, against real Foghorn and Signalman processes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_requests import Client

from tests.interfaces.conftest import OPERATOR_TOKEN, Platform

pytestmark = pytest.mark.integration


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds the operator's token to every call (reflection is an operator's tool)."""

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or []), ("authorization", f"Bearer {OPERATOR_TOKEN}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def reflection_client(address: str) -> Client:
    return Client(address, interceptors=[_Bearer()])


def test_a_reflection_driven_client_discovers_and_calls_each_service(platform: Platform) -> None:
    foghorn = reflection_client(f"127.0.0.1:{platform.foghorn_grpc}")
    names = set(foghorn.service_names)
    assert {"foghorn.v1.Routing", "foghorn.v1.NodeAdmin", "grpc.health.v1.Health"} <= names
    assert {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    # Calls built from reflected descriptors alone: no generated stubs on this side.
    listed = foghorn.request("foghorn.v1.NodeAdmin", "ListNodes", {})
    assert isinstance(listed, dict)
    with pytest.raises(grpc.RpcError) as err:
        foghorn.request("foghorn.v1.Routing", "RouteViewer", {"content_id": "x" * 300})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # Foghorn's own answer
    signalman = reflection_client(f"127.0.0.1:{platform.signalman_grpc}")
    assert "signalman.v1.Signalman" in signalman.service_names
    health = signalman.request("grpc.health.v1.Health", "Check", {"service": ""})
    assert health == {"status": "SERVING"}


def test_reflection_v1_answers_like_v1alpha(platform: Platform) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{platform.foghorn_grpc}") as channel:
        metadata = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
        listed = {}
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            ]
            replies = list(call(iter(requests), metadata=metadata, timeout=5))
            listed[version] = {s.name for s in replies[0].list_services_response.service}
            assert replies[1].file_descriptor_response.file_descriptor_proto, version
        assert listed["v1"] == listed["v1alpha"] and "foghorn.v1.Routing" in listed["v1"]


def test_the_standard_health_stub_checks_lists_and_names_unknown_services(
    platform: Platform,
) -> None:
    for port, service in ((platform.foghorn_grpc, "foghorn.v1.Routing"),
                          (platform.signalman_grpc, "signalman.v1.Signalman")):  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
            )
            listed = stub.List(health_pb2.HealthListRequest(), timeout=5).statuses
            assert listed[""].status == serving and listed[service].status == serving
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no.such.Service" in err.value.details() and service in err.value.details()
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert next(iter(watch)).status == serving
            watch.cancel()
