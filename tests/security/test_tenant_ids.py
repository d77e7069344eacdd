"""One tenant-id syntax at every entry (pkg.common.tenant): Foghorn's load reports, the event
envelope, platform token entries and Bridge's JWT tenant claim accept and refuse the same ids."""

from __future__ import annotations

import json

import pytest

from api_balancing import errors, validation
from api_gateway.auth import AuthError, JwtAuthenticator, JwtSettings
from pkg.common.auth import TokenSpecError, parse_tokens
from pkg.common.clock import FakeClock
from pkg.common.tenant import is_tenant_id
from pkg.events.envelope import EnvelopeError, decode_record
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.bridge.fakes import SECRET, token

GOOD = ["acme", "globex-eu", "t0", "a_b", "x" * 63]
BAD = ["Acme", "acme.eu", "acme:eu", "acme/eu", "-acme", "", "x" * 64, "acme\n", "ac me", "é"]


def foghorn_accepts(tenant: str) -> bool:
    report = pb.LoadReport(
        cpu_percent=1, ram_used_bytes=1, ram_max_bytes=2,
        streams=[pb.StreamLoad(stream_id="s1", tenant_id=tenant)],
    )  # fmt: skip
    try:
        validation.report(report)
    except errors.FoghornError:
        return False
    return True


def envelope_accepts(tenant: str) -> bool:
    record = json.dumps({"v": 1, "id": "e", "type": "stream.started", "tenant": tenant})
    try:
        decode_record(record.encode(), None)
    except EnvelopeError:
        return False
    return True


def token_spec_accepts(tenant: str) -> bool:
    try:
        parse_tokens(f"secret=name@{tenant}:tenant-user")
    except TokenSpecError:
        return False
    return True


def jwt_accepts(tenant: str) -> bool:
    auth = JwtAuthenticator(JwtSettings(hs256_secret=SECRET), FakeClock())
    try:
        auth.authenticate(f"Bearer {token(tenant)}")
    except AuthError:
        return False
    return True


@pytest.mark.parametrize("tenant", GOOD + BAD)
def test_every_entry_accepts_exactly_the_tenant_id_syntax(tenant: str) -> None:
    expected = is_tenant_id(tenant)
    assert expected == (tenant in GOOD)
    assert foghorn_accepts(tenant) is expected
    assert envelope_accepts(tenant) is expected
    assert token_spec_accepts(tenant) is expected
    if tenant.strip():  # an empty or blank claim is "no tenant", refused on its own
        assert jwt_accepts(tenant) is expected


def test_the_platform_tenant_is_reserved_for_platform_events() -> None:
    assert envelope_accepts("system")  # platform events carry it
    assert not token_spec_accepts("system")
    assert not jwt_accepts("system")
