"""The pipeline's shortcuts for the common case give the same results as the full path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkg.events import Event
from pkg.events.envelope import EnvelopeError, decode_record, encode_event, valid_tenant
from signalman.pipeline import Processed, process_record
from signalman.redact import needs_redaction, redact

_keys = st.sampled_from(
    ["node", "seq", "password", "API-Key", "viewer_ip", "addr", "ip_version", "token_count", "x"]
) | st.text(max_size=12)
_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values | st.sampled_from(["10.1.2.3", "2001:db8::1"]), max_size=6))
def test_data_that_needs_no_redaction_is_exactly_what_redaction_returns(
    data: dict[str, Any],
) -> None:
    if not needs_redaction(data):
        assert redact(data) == data


def test_an_event_without_secrets_is_passed_on_and_one_with_secrets_is_copied() -> None:
    clean = Event("stream.started", "acme", {"stream": "s1", "n": 2})
    result = process_record(encode_event(clean), b"acme")
    assert isinstance(result, Processed) and result.items[0][1] == clean
    secret = Event("stream.started", "acme", {"stream": "s1", "token": "abc"})
    result = process_record(encode_event(secret), b"acme")
    assert isinstance(result, Processed)
    assert result.items[0][1].data == {"stream": "s1", "token": "[redacted]"}


def test_validation_remembers_names_but_still_rejects_bad_ones() -> None:
    assert valid_tenant("acme") and valid_tenant("acme")  # the second from the cache
    for bad in ("acme\n", "a b", "", "-acme"):
        assert not valid_tenant(bad), bad
    raw = b'{"v": 1, "type": "stream.started\\n", "tenant": "acme", "id": "x"}'
    with pytest.raises(EnvelopeError, match="dotted event type"):
        decode_record(raw)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("v", True, "envelope.v"),
        ("schema_version", True, "schema_version"),
        ("time", False, "time"),
        ("time", "1.5", "time"),
    ],
)
def test_booleans_are_not_numbers_in_an_envelope(field: str, value: Any, reason: str) -> None:
    import json

    obj = {"v": 1, "type": "stream.started", "tenant": "acme", "id": "x", field: value}
    with pytest.raises(EnvelopeError, match=reason):
        decode_record(json.dumps(obj).encode())
