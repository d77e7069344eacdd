"""Deny by default: every method every process serves is in its access map, and each one
refuses every credential without its role (PERMISSION_DENIED naming the role) and every caller
without a token (UNAUTHENTICATED), except the public ones.

The methods are enumerated from the running servers (reflection), not from our own lists: a
service mounted without an access-map entry fails here.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from api_balancing.access import FOGHORN_ACCESS
from api_realtime.access import SIGNALMAN_ACCESS
from pkg.common.authz import AccessMap
from tests.security import conftest as sec
from tests.security.conftest import Foghorn, Signalman

pytestmark = pytest.mark.integration

# Which roles each credential of the suite holds.
ROLES_OF = {
    sec.OPS: {"operator"},
    sec.NODE_PARIS: {"node"},
    sec.RELAY: {"replica"},
    sec.SYSTEM: {"system"},
    sec.NOROLE: set(),
    sec.ACME_USER: {"tenant-user"},
    sec.ACME_ADMIN: {"tenant-admin"},
}


class _Metadata(grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.metadata = sec.auth(token)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, requests)


def served_methods(target: str) -> list[str]:
    """Every method of every service the server at ``target`` describes (operator reflection)."""
    with grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, _Metadata(sec.OPS))
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        methods = []
        for service in database.get_services():
            descriptor = pool.FindServiceByName(service)
            methods.extend(f"/{service}/{m.name}" for m in descriptor.methods)
    return sorted(methods)


@pytest.fixture(scope="module")
def foghorn_ha(foghorn_factory: Callable[..., Foghorn], redis_server: Any) -> Foghorn:
    """A Foghorn in HA mode (it also serves the replica relay)."""
    return foghorn_factory(
        {"FOGHORN_REDIS_URL": redis_server.url, "FOGHORN_CLUSTER": f"sec{uuid.uuid4().hex[:6]}"},
        name="foghorn-ha",
    )


def test_every_method_foghorn_serves_is_in_its_access_map(foghorn_ha: Foghorn) -> None:
    methods = served_methods(foghorn_ha.target)
    assert "/foghorn.v1.Relay/Deliver" in methods and "/grpc.health.v1.Health/Check" in methods
    assert FOGHORN_ACCESS.unmapped(methods) == []


def test_every_method_signalman_serves_is_in_its_access_map(signalman: Signalman) -> None:
    methods = served_methods(signalman.target)
    assert "/signalman.v1.Signalman/Subscribe" in methods
    assert SIGNALMAN_ACCESS.unmapped(methods) == []


async def _one_empty_message() -> AsyncIterator[bytes]:
    # One message at once: the refusal must reach a client that is writing (the server reads
    # what it sends before refusing, pkg.common.authz.drain_requests); it then keeps the
    # stream open without writing, as a node waiting for its registration answer does.
    yield b""
    await asyncio.sleep(3600)


async def call(target: str, method: str, token: str | None, wait_s: float = 0.5) -> grpc.StatusCode:
    """Call ``method`` with an empty body; the status (OK when a stream is still open after
    ``wait_s``: it was let in)."""
    async with grpc.aio.insecure_channel(target) as channel:
        metadata = sec.auth(token)
        try:
            stream: Any = None
            if method.endswith(("/Connect", "/Subscribe", "/ServerReflectionInfo")):
                stream = channel.stream_stream(method)(_one_empty_message(), metadata=metadata)
            elif method.endswith("/Watch"):
                stream = channel.unary_stream(method)(b"", metadata=metadata)
            if stream is not None:
                try:
                    first = await asyncio.wait_for(stream.read(), wait_s)
                except TimeoutError:
                    first = None  # still open: it was let in
                if first is grpc.aio.EOF:
                    return await stream.code()
                stream.cancel()
                return grpc.StatusCode.OK
            await channel.unary_unary(method)(b"", metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def check_matrix(target: str, access: AccessMap, methods: list[str]) -> None:
    for method in methods:
        rule = access.grpc[method]
        anonymous = await call(target, method, None)
        if rule.public:
            assert anonymous != grpc.StatusCode.UNAUTHENTICATED, method
        else:
            assert anonymous == grpc.StatusCode.UNAUTHENTICATED, method
        for token, roles in ROLES_OF.items():
            code = await call(target, method, token)
            refused = code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
            allowed = rule.public or bool(roles & rule.roles)
            assert refused is not allowed, (method, token, code)


async def test_foghorn_refuses_every_credential_without_the_methods_role(
    foghorn_ha: Foghorn,
) -> None:
    await check_matrix(foghorn_ha.target, FOGHORN_ACCESS, served_methods(foghorn_ha.target))


async def test_signalman_refuses_every_credential_without_the_methods_role(
    signalman: Signalman,
) -> None:
    target = signalman.target
    await check_matrix(target, SIGNALMAN_ACCESS, served_methods(target))


async def test_a_refusal_names_the_missing_role(foghorn: Foghorn) -> None:
    async with grpc.aio.insecure_channel(foghorn.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/foghorn.v1.NodeAdmin/ListNodes")(
                b"", metadata=sec.auth(sec.NODE_PARIS), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "requires role operator" in (err.value.details() or "")
    assert "'edge-paris' has node" in (err.value.details() or "")


async def test_a_credential_without_a_role_can_do_nothing_not_even_list(foghorn: Foghorn) -> None:
    for method in served_methods(foghorn.target):
        if FOGHORN_ACCESS.grpc[method].public:
            continue
        code = await call(foghorn.target, method, sec.NOROLE)
        assert code == grpc.StatusCode.PERMISSION_DENIED, method


async def test_a_refused_stream_reaches_a_client_that_is_still_writing(foghorn: Foghorn) -> None:
    """grpcio's asyncio client reports INTERNAL "Internal error from Core" instead of the
    server's status when its own write is in flight as the status arrives (grpc/grpc#36066):
    2 in 3 refused node streams that write a few messages at once did, before the server read
    what they send before refusing. Each must now see UNAUTHENTICATED and its message."""
    register = sec.register_msg("edge-paris-writer").SerializeToString()

    async def one(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
        async def messages() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield register

        call = channel.stream_stream("/foghorn.v1.NodeControl/Connect")(messages())
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await call.code(), await call.details()

    async with grpc.aio.insecure_channel(foghorn.target) as channel:
        results = []
        for _ in range(10):
            results += await asyncio.gather(*(one(channel) for _ in range(20)))
    assert {code for code, _ in results} == {grpc.StatusCode.UNAUTHENTICATED}, results[:3]
    assert all("requires a bearer token (node)" in details for _, details in results)


def test_a_token_spec_with_the_old_catch_all_admin_role_stops_the_process(
    tmp_path: Any,
) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "api_balancing", "--grpc-port", "0", "--http-port", "-1"],
        env={"PLATFORM_TOKENS": "secret=ops:admin", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "unknown role 'admin'" in result.stderr
    assert "secret" not in result.stderr.replace("'admin'", "")  # the token itself is not logged
