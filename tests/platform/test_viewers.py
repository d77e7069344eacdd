"""The background viewers of ./dev up report each interval and keep no older samples."""

from __future__ import annotations

from devtools.drill_traffic import Recorder
from devtools.viewers import parser, summary


def test_summary_reports_the_interval_then_forgets_its_samples() -> None:
    recorder = Recorder("foghorn")
    recorder.add(0.0, True)
    recorder.add(0.0, False, "UNAVAILABLE: replica down")
    line = summary(recorder)
    assert line.startswith("foghorn: 2 routed, 1 failed")
    assert "UNAVAILABLE: replica down" in line
    assert recorder.samples == []
    assert summary(recorder).startswith("foghorn: 0 routed, 0 failed")


def test_addresses_are_comma_separated_lists() -> None:
    args = parser().parse_args(["--foghorn", "127.0.0.1:1, 127.0.0.1:2", "--rate", "2"])
    assert args.foghorn == ["127.0.0.1:1", "127.0.0.1:2"]
    assert args.bridge == []
