"""What a lease holder records for the history checker, on a real Redis: every term with its
epoch and the end of the holder's own view of it, and a clean hand-over passes the checker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from devtools.checker import Rec, check
from pkg.common import history
from pkg.coord import LeaderLease

pytestmark = pytest.mark.integration


@pytest.fixture
def recording() -> Iterator[None]:
    history.set_enabled(True)
    try:
        yield
    finally:
        history.set_enabled(None)


def records(logs: list[dict[str, object]]) -> list[Rec]:
    return [Rec.from_json(entry) for entry in logs if entry.get("event") == "history"]


async def test_terms_are_recorded_with_epochs_and_pass_the_checker(
    redis: aioredis.Redis, prefix: str, recording: None
) -> None:
    key = f"{prefix}:leader"
    a = LeaderLease(redis, key, "a", ttl_s=10, renew_every_s=1)
    b = LeaderLease(redis, key, "b", ttl_s=10, renew_every_s=1)
    with capture_logs() as logs:
        await a.try_acquire()
        assert await a.renew()
        await a.release()
        await b.try_acquire()
    recs = records(logs)
    assert [(r.holder, r.op, r.token) for r in recs] == [
        ("a", "acquire", 1), ("a", "renew", 1), ("a", "release", 1), ("b", "acquire", 2),
    ]  # fmt: skip
    first = recs[0]
    assert first.kind == "lease" and first.resource == key
    assert first.t_sent is not None and first.t_sent <= first.t
    assert first.valid_until is not None and first.valid_until > first.t + 8
    assert check(recs).clean


async def test_nothing_is_recorded_unless_enabled(redis: aioredis.Redis, prefix: str) -> None:
    history.set_enabled(False)
    try:
        with capture_logs() as logs:
            await LeaderLease(
                redis, f"{prefix}:leader", "a", ttl_s=10, renew_every_s=1
            ).try_acquire()
    finally:
        history.set_enabled(None)
    assert records(logs) == []
