"""A subscriber's event batch stays under the transport's message size (pure session logic)."""

from __future__ import annotations

from typing import Any

from pkg.common.auth import Principal
from signalman.history import Entry
from signalman.pipeline import Processed, oversized, process_record
from signalman.session import EVENT_FRAMING, OutEvent, Session


def queued_session(bodies: list[int]) -> Session:
    session = Session("s1", Principal("p", "acme"), history=None, feeds=None, buffer=1000)  # type: ignore[arg-type]
    for offset, size in enumerate(bodies, 1):
        session.queue.put_nowait(OutEvent("all", "e", Entry(offset, "streams", b"x" * size)))
    return session


def test_take_events_stops_before_the_byte_budget() -> None:
    session = queued_session([3000] * 40)
    taken = session.take_events(99, max_bytes=10 * (3000 + EVENT_FRAMING))
    assert len(taken) == 10  # 120 KB were waiting; one batch carries 30 KB
    assert session.queue.qsize() == 30  # the rest waits for the next write, in order
    assert session.take_events(99)[0].entry.offset == 11


def test_take_events_without_a_budget_counts_only() -> None:
    assert len(queued_session([3000] * 40).take_events(25)) == 25


def test_an_event_larger_than_a_message_is_poison() -> None:
    def record(blob: str) -> bytes:
        return (
            b'{"v":1,"id":"e1","type":"stream.started","tenant":"acme","data":{"b":"'
            + blob.encode()
            + b'"}}'
        )

    small: Any = process_record(record("y" * 100), b"acme", max_event_bytes=1000)
    assert isinstance(small, Processed)
    big = process_record(record("y" * 5000), b"acme", max_event_bytes=1000)
    assert not isinstance(big, Processed) and "more than a subscriber message" in big.reason
    assert oversized(small, 1000) is None
