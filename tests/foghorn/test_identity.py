"""The report check's shortcut: a stream's next report listing the same streams skips only the
credential's checks (which depend on nothing else); bindings are compared on every report."""

from __future__ import annotations

import pytest

from api_balancing import errors, validation
from api_balancing.identity import check_report
from api_balancing.model import LoadReport
from pkg.common.auth import Principal
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb

NODE = Principal(name="edge-creds", roles=frozenset({"node"}), nodes=("*",), tenants=("acme",))


def message(viewers: int, *streams: tuple[str, str]) -> pb.LoadReport:
    return pb.LoadReport(
        cpu_percent=10,
        ram_used_bytes=1,
        ram_max_bytes=2,
        streams=[pb.StreamLoad(stream_id=s, tenant_id=t, viewers=viewers) for s, t in streams],
    )


def test_the_next_report_of_the_same_streams_shares_the_checked_tuples() -> None:
    first = validation.report(message(1, ("live-1", "acme"), ("live-2", "acme")))
    checked = check_report(NODE, "n1", first, {}.get)
    second = validation.report(message(7, ("live-1", "acme"), ("live-2", "acme")), first)
    assert second.stream_ids is first.stream_ids and second.tenant_ids is first.tenant_ids
    bound = {"live-1": "acme", "live-2": "acme"}
    assert check_report(NODE, "n1", second, bound.get, checked=checked) == checked
    assert second.viewers == 14


def test_a_binding_that_changed_refuses_an_unchanged_stream_list() -> None:
    first = validation.report(message(1, ("live-1", "acme"), ("live-2", "acme")))
    checked = check_report(NODE, "n1", first, {}.get)
    second = validation.report(message(2, ("live-1", "acme"), ("live-2", "acme")), first)
    bound = {"live-1": "acme", "live-2": "globex"}
    with pytest.raises(errors.PermissionDenied) as caught:
        check_report(NODE, "n1", second, bound.get, checked=checked)
    assert caught.value.field == "report.streams[1].tenant_id"
    assert "belongs to another tenant" in caught.value.message


def test_equal_streams_checked_for_another_report_are_checked_in_full() -> None:
    # ``checked`` vouches only for the very tuples it names: equal ones built elsewhere (not
    # shared by validation from this stream's last report) get every check.
    other = Principal(name="other", roles=frozenset({"node"}), nodes=("*",), tenants=("globex",))
    report = LoadReport(10.0, 1, 2, 0, 0, 0, validation.report(message(1, ("s", "acme"))).streams)
    vouched = (("s",), ("acme",))
    with pytest.raises(errors.PermissionDenied) as caught:
        check_report(other, "n1", report, {}.get, checked=vouched)
    assert caught.value.field == "report.streams[0].tenant_id"


def test_a_report_of_new_streams_is_checked_in_full() -> None:
    first = validation.report(message(1, ("live-1", "acme")))
    checked = check_report(NODE, "n1", first, {}.get)
    second = validation.report(message(1, ("live-1", "acme"), ("live-9", "globex")), first)
    with pytest.raises(errors.PermissionDenied) as caught:
        check_report(NODE, "n1", second, {"live-1": "acme"}.get, checked=checked)
    assert caught.value.field == "report.streams[1].tenant_id"
