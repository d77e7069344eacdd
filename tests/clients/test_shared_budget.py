"""Retry budgets shared through a real redis-server: the replicas of a caller retry as one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest

from pkg.clients import (
    BreakerPolicy,
    BudgetPolicy,
    Policy,
    RetryPolicy,
    Runtime,
    SharedBudgetStore,
    aio_channel,
)
from pkg.devstack.servers import RedisServer, ServerProcess
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import attempts, failing

pytestmark = pytest.mark.integration

REPLICAS = 4
CALLS_EACH = 10
POLICY = Policy(
    timeout=5.0,
    retry=RetryPolicy(max_attempts=4, base_backoff=0.001, max_backoff=0.001),
    breaker=BreakerPolicy(enabled=False),
    budget=BudgetPolicy(max_tokens=10, token_ratio=0.1),
)


@pytest.fixture
def stores(redis_server: ServerProcess) -> Iterator[list[SharedBudgetStore]]:
    """One store per simulated caller replica, in a fresh namespace of one Redis."""
    assert isinstance(redis_server, RedisServer)
    namespace = f"budget-{uuid.uuid4().hex[:8]}"
    made = [SharedBudgetStore(redis_server.url, namespace=namespace) for _ in range(REPLICAS)]
    try:
        yield made
    finally:
        for store in made:
            store.close()


async def _outage_retries(
    target: str, stats_stub: pb_grpc.TestServiceStub, key: str, runtimes: list[Runtime]
) -> int:
    """Interleaved calls from every replica to a target that fails everything: the retries
    (server attempts beyond one per call) they made together."""
    channels = [aio_channel(target, POLICY, runtime=runtime) for runtime in runtimes]
    stubs = [pb_grpc.TestServiceStub(channel) for channel in channels]
    for _ in range(CALLS_EACH):
        for stub in stubs:
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Unary(failing(key, -1), timeout=5)
            for runtime in runtimes:  # what every replica's sync thread does within ms
                if runtime.shared_budgets is not None:
                    runtime.shared_budgets.sync_now()
    for channel in channels:
        await channel.close()
    return (await attempts(stats_stub, key)).attempts - REPLICAS * CALLS_EACH


async def test_replicas_sharing_a_budget_retry_no_more_than_one_budget_allows(
    target: str, stats_stub: pb_grpc.TestServiceStub, key: str, stores: list[SharedBudgetStore]
) -> None:
    shared = await _outage_retries(
        target, stats_stub, key, [Runtime(shared_budgets=store) for store in stores]
    )
    alone = await _outage_retries(
        target, stats_stub, key + "-alone", [Runtime() for _ in range(REPLICAS)]
    )
    # One bucket of 10 allows retries while more than 5 tokens are left: each failed attempt
    # takes one, so the first call's three retries (10 -> 6) are all a bucket gives in an
    # outage, whatever the number of replicas; four separate buckets give four times as many.
    per_bucket = 3
    assert shared == per_bucket
    assert alone == REPLICAS * per_bucket


async def test_a_new_replica_starts_from_the_shared_level_not_a_full_bucket(
    target: str, stats_stub: pb_grpc.TestServiceStub, key: str, stores: list[SharedBudgetStore]
) -> None:
    first = Runtime(shared_budgets=stores[0])
    await _outage_retries(target, stats_stub, key, [first])
    late = Runtime(shared_budgets=stores[1])  # a replica that starts during the outage
    assert late.budget(target, POLICY).tokens <= 5
    assert not late.budget(target, POLICY).can_retry()


def test_shared_budget_store_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="url"):
        SharedBudgetStore()
    with pytest.raises(ValueError, match="sync_interval"):
        SharedBudgetStore("redis://127.0.0.1:1/0", sync_interval=0)
