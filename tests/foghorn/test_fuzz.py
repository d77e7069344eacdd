"""No load report crashes Foghorn: hypothesis drives arbitrary report fields over one real
control stream; each report is either accepted or rejected with a field, and the stream and
the last good state survive."""

from __future__ import annotations

import asyncio
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_balancing import validation
from api_balancing.errors import FoghornError
from api_balancing.model import LoadReport, StreamLoad
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb
from tests.foghorn.conftest import Harness, eventually, report_msg

INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-5, 10**10))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 110))
TEXT = st.one_of(st.text(max_size=300), st.sampled_from(["s1", "", "a/b", "x" * 257]))
streams = st.lists(
    st.builds(
        pb.StreamLoad,
        stream_id=TEXT,
        tenant_id=TEXT,
        viewers=INT64,
        inputs=INT64,
        upload_bps=INT64,
    ),
    max_size=5,
)
reports = st.builds(
    pb.LoadReport,
    cpu_percent=FLOATS,
    ram_used_bytes=INT64,
    ram_max_bytes=INT64,
    upload_bps=INT64,
    download_bps=INT64,
    bandwidth_limit_bps=INT64,
    streams=streams,
)


@settings(max_examples=300, deadline=None)
@given(reports)
def test_validation_accepts_or_names_a_field_for_any_report(report: pb.LoadReport) -> None:
    try:
        good = validation.report(report)
    except FoghornError as exc:
        assert exc.field.startswith("report.")
        assert exc.code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
        return
    assert 0 <= good.cpu_percent <= 100 and math.isfinite(good.cpu_percent)
    assert 0 <= good.ram_used_bytes <= good.ram_max_bytes


def _outcome(report: pb.LoadReport, previous: LoadReport | None) -> object:
    try:
        return validation.report(report, previous)
    except FoghornError as exc:
        return (exc.code, exc.field, exc.message)


@settings(max_examples=300, deadline=None)
@given(reports, reports)
def test_validation_against_the_previous_report_decides_as_without_it(
    before: pb.LoadReport, report: pb.LoadReport
) -> None:
    # The previous report's streams only let the same ids skip their syntax checks: the
    # verdict (or the record) is the same as with no previous report, whatever they are.
    try:
        previous = validation.report(before)
    except FoghornError:
        # Streams that failed validation are never stored; take the ones that pass.
        previous = LoadReport(1.0, 1, 2, 0, 0, 0, tuple(
            StreamLoad(s.stream_id, s.tenant_id)
            for s in before.streams
            if validation.CONTENT_ID_RE.fullmatch(s.stream_id)
            and validation.TENANT_RE.fullmatch(s.tenant_id)
        ))  # fmt: skip
    # The previous streams with the numbers of the new report (any, valid or not): the case
    # the shortcut is for; and the previous streams followed by the new report's.
    same, more = pb.LoadReport(), pb.LoadReport()
    same.CopyFrom(report)
    more.CopyFrom(report)
    del same.streams[:], more.streams[:]
    numbers = list(report.streams) or [pb.StreamLoad(viewers=3)]
    for i, s in enumerate(previous.streams):
        n = numbers[i % len(numbers)]
        same.streams.add(stream_id=s.stream_id, tenant_id=s.tenant_id, viewers=n.viewers,
                         inputs=n.inputs, upload_bps=n.upload_bps)  # fmt: skip
    for s in list(before.streams) + list(report.streams):
        more.streams.add(stream_id=s.stream_id, tenant_id=s.tenant_id, viewers=s.viewers,
                         inputs=s.inputs, upload_bps=s.upload_bps)  # fmt: skip
    for candidate in (report, same, more):
        got = _outcome(candidate, previous)
        assert got == _outcome(candidate, None)
        if isinstance(got, LoadReport):  # derived attributes are those of its own streams
            assert got.stream_ids == tuple(s.stream_id for s in got.streams)
            assert got.tenant_ids == tuple(s.tenant_id for s in got.streams)
            assert got.viewers == sum(s.viewers for s in got.streams)


async def test_fuzzed_reports_never_break_the_server_or_the_stream(foghorn: Harness) -> None:
    stream = await foghorn.node("fuzz", report_msg(cpu=12))
    samples: list[pb.LoadReport] = []

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(reports)
    def collect(report: pb.LoadReport) -> None:
        samples.append(report)

    collect()
    expected_ok = 0
    for report in samples:
        try:
            validation.report(report)
            expected_ok += 1
        except FoghornError:
            pass
        stream.report(report)
    rejected = len(samples) - expected_ok
    await eventually(
        lambda: (
            foghorn.fleet.counters.reports_rejected == rejected
            and foghorn.reports_of("fuzz") == 1 + expected_ok
        ),
        timeout=20,
        what="every fuzzed report handled",
    )
    for _ in range(rejected):
        msg = await stream.read()
        assert msg.WhichOneof("msg") == "rejected" and msg.rejected.field.startswith("report.")
    # Still connected and still serving: a good report lands and routing works.
    stream.report(report_msg(cpu=7))
    await eventually(lambda: foghorn.reports_of("fuzz") == 2 + expected_ok)
    info = await foghorn.ops.get_node("fuzz")
    assert info.health.connected and info.last_report.cpu_percent == 7
    assert (await foghorn.anon.route_viewer("s1")).best.node_id == "fuzz"
    await asyncio.sleep(0)
