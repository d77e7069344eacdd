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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from pkg.devstack.servers import free_port
from signalman.consumer import ensure_topics
from signalman.deadletter import DeadLetterProducer, Redriver
from signalman.history import SourcePos
from signalman.kafka_clients import start_client
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


@contextlib.asynccontextmanager
async def nothing_left_running() -> AsyncIterator[None]:
    """The block's Kafka clients end every task they started (within 20 s, a stop may go on in
    the background) and none is reported collected while open."""
    before = asyncio.all_tasks()
    with unclosed_clients_reported() as reported:
        yield
        await wait_until(lambda: not asyncio.all_tasks() - before, timeout=20,
                         what="the clients' tasks to end")  # fmt: skip
    assert reported == []


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
async def test_a_redriver_joins_no_group_so_its_start_and_stop_wait_for_no_join(
    kafka_broker: Any,
) -> None:
    """The re-driver joins no consumer group (the singleton lease already makes it the only
    one): its first run and its close take a few round trips, never a join the broker holds
    for seconds (half the session: 5 s; a stopping Signalman spent 4-5 s in its re-driver's
    join or close, and a new singleton holder re-drove nothing until its join completed)."""
    bootstrap = kafka_broker.bootstrap
    member = redriver(bootstrap)
    await ensure_topics(bootstrap, {member.dlq_topic: 2})
    async with nothing_left_running():
        started = time.monotonic()
        assert await member.run_once() == 0
        first_run_s = time.monotonic() - started
        started = time.monotonic()
        await member.close()
        close_s = time.monotonic() - started
    assert first_run_s < 2.0, f"the first run took {first_run_s:.2f} s (a group join?)"
    assert close_s < 1.0, f"the close took {close_s:.2f} s"


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_redriver_assigns_itself_every_partition_of_the_dead_letter_topic(
    kafka_broker: Any,
) -> None:
    bootstrap = kafka_broker.bootstrap
    member = redriver(bootstrap)

    async def assigned() -> set[int]:
        await member.run_once()
        consumer = member._consumer
        return {tp.partition for tp in consumer.assignment()} if consumer is not None else set()

    async def all_three() -> bool:
        return await assigned() == {0, 1, 2}

    try:
        assert await assigned() == set()  # no dead-letter topic yet: nothing to do
        await ensure_topics(bootstrap, {member.dlq_topic: 3})
        await wait_until(all_three, timeout=20, what="every partition assigned")
    finally:
        await member.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_consumer_cancelled_while_joining_its_group_is_stopped_without_holding_its_owner(
    kafka_broker: Any,
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = f"ev-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {topic: 1})
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                enable_auto_commit=False)  # fmt: skip
    # Leaving the join in flight takes the broker a few seconds; the stop goes on meanwhile.
    async with nothing_left_running():
        # A subscribed consumer's start() waits for the group's first assignment, which the
        # broker holds for seconds: the cancellation lands inside it.
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(start_client(consumer), 0.3)
        # The cancelled owner is not held by the stop (it waited 5 s, the stop's bound, and so
        # did a stopping replica's exit): it returns, the stop finishes in the background.
        assert time.monotonic() - started < 2.0
