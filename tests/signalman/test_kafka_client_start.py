"""Kafka clients whose start fails or is cancelled half-way are stopped, not left open.

aiokafka reports a client garbage-collected while still open ("Unclosed AIOKafkaConsumer") through
the event loop's exception handler; a half-started consumer also keeps background tasks running
(it goes on joining its group). Each Signalman user of a Kafka client is checked on a real broker
(cancelled while joining) or on a port nothing listens on (the start fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from pkg.devstack.servers import free_port
from signalman.consumer import ensure_topics
from signalman.deadletter import DeadLetterProducer, Redriver
from signalman.history import SourcePos
from signalman.processor import DeadLetter
from signalman.singleton import GroupLag
from tests.signalman.conftest import wait_until


@contextlib.contextmanager
def unclosed_clients_reported() -> Iterator[list[str]]:
    """Collects what aiokafka reports about clients collected while open (checked on exit,
    after a garbage collection)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(str(ctx.get("message"))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # the same report, as a warning
            yield reported
            gc.collect()
    finally:
        loop.set_exception_handler(previous)


def redriver(bootstrap: str) -> Redriver:
    suffix = uuid.uuid4().hex[:8]
    return Redriver(bootstrap, f"ev-{suffix}", f"ev-{suffix}.dlq", f"g-{suffix}",
                    delay_s=1.0, max_attempts=3)  # fmt: skip


async def start_redriver(bootstrap: str) -> None:
    await redriver(bootstrap)._ensure()


async def send_dead_letter(bootstrap: str) -> None:
    letter = DeadLetter(SourcePos("ev", 0, 0), b"k", b"v", "bad", retryable=False)
    await DeadLetterProducer(bootstrap, "ev.dlq")(letter)


async def refresh_lag(bootstrap: str) -> None:
    await GroupLag(bootstrap, "ev", f"g-{uuid.uuid4().hex[:8]}").refresh()


@pytest.mark.parametrize(
    "start",
    [start_redriver, send_dead_letter, refresh_lag],
    ids=["redriver", "dead-letter-producer", "group-lag"],
)
async def test_a_client_whose_start_fails_is_stopped(
    start: Callable[[str], Awaitable[None]],
) -> None:
    nothing_there = f"127.0.0.1:{free_port()}"
    with (
        unclosed_clients_reported() as reported,
        pytest.raises(Exception, match="Unable to bootstrap"),
    ):
        await start(nothing_there)
    assert reported == []


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_redriver_cancelled_while_joining_its_group_stops_its_consumer(
    kafka_broker: Any,
) -> None:
    bootstrap = kafka_broker.bootstrap
    member = redriver(bootstrap)
    await ensure_topics(bootstrap, {member.dlq_topic: 1})
    before = asyncio.all_tasks()
    with unclosed_clients_reported() as reported:
        # A subscribed consumer's start() waits for the group's first assignment, which the
        # broker holds for seconds: the cancellation lands inside it.
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(member._ensure(), 0.3)
        # The cancelled owner is not held by the stop (it waited 5 s, the stop's bound, and so
        # did a stopping replica's exit): it returns, the stop finishes in the background.
        assert time.monotonic() - started < 2.0
        # Leaving the join in flight takes the broker a few seconds; the stop goes on meanwhile.
        await wait_until(lambda: not asyncio.all_tasks() - before, timeout=20,
                         what="the half-started consumer's tasks to end")  # fmt: skip
    assert reported == []
    assert member._consumer is None  # never handed out: the next run starts a fresh one
