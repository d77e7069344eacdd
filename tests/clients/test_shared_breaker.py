"""Breaker state shared through a real redis-server: replicas of a caller act as one."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkg.clients import BreakerOpenError, BreakerPolicy, Policy, RetryPolicy, Runtime, sync_channel
from pkg.clients.breaker import (
    BREAKER_FAILURE,
    BREAKER_SUCCESS,
    STATE_CLOSED,
    STATE_OPEN,
    TICKET_PROBE,
    CircuitBreaker,
)
from pkg.clients.shared_breaker import SharedBreakerStore
from pkg.devstack.servers import RedisServer, free_port
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.shared_breaker_peer import POLICY

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("shared_breaker_peer.py")


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_breaker_opened_by_one_process_is_seen_and_closed_by_another(
    redis_server, testsvc, process_factory, sync_stub
) -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    target = f"127.0.0.1:{testsvc.port}"
    peer_key, my_key = f"peer-{namespace}", f"me-{namespace}"
    peer = process_factory(
        "breaker-peer",
        [
            sys.executable,
            str(PEER),
            "--redis",
            redis_server.url,
            "--target",
            target,
            "--key",
            peer_key,
            "--namespace",
            namespace,
        ],
        ready_port=testsvc.port,
        env={"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    wait_for(lambda: "peer: opened state=open" in peer.log_path.read_text(), what="peer opens")
    peer_attempts = sync_stub.GetStats(pb.StatsRequest(key=peer_key), timeout=5).attempts
    assert peer_attempts >= 5

    store = SharedBreakerStore(redis_server.url, namespace=namespace, sync_interval=0.05)
    runtime = Runtime(shared_breakers=store)
    channel = sync_channel(target, POLICY, runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    try:
        # This process never saw a failure, yet its very first call fails fast.
        with pytest.raises(BreakerOpenError):
            stub.Unary(pb.UnaryRequest(key=my_key), timeout=5)
        assert sync_stub.GetStats(pb.StatsRequest(key=my_key), timeout=5).attempts == 0

        # After the open duration this process gets the single shared probe, succeeds, and
        # the peer sees the breaker close.
        def probe() -> bool:
            try:
                stub.Unary(pb.UnaryRequest(key=my_key), timeout=5)
                return True
            except BreakerOpenError:
                return False

        wait_for(probe, what="the shared probe")
        assert runtime.breakers[target].state == STATE_CLOSED
        wait_for(lambda: "peer: closed" in peer.log_path.read_text(), what="peer sees closed")
        assert sync_stub.GetStats(pb.StatsRequest(key=my_key), timeout=5).attempts == 1
    finally:
        channel.close()
        store.close()


@pytest.fixture
def two_stores(redis_server: RedisServer) -> Iterator[list[SharedBreakerStore]]:
    """Two stores in a fresh namespace of one Redis: two processes' view of shared breakers."""
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    stores = [
        SharedBreakerStore(redis_server.url, namespace=namespace, sync_interval=0.05)
        for _ in range(2)
    ]
    try:
        yield stores
    finally:
        for store in stores:
            store.close()


def breaker_of(store: SharedBreakerStore, policy: Policy) -> CircuitBreaker:
    """The breaker of one target in a runtime that shares it through ``store``."""
    return Runtime(shared_breakers=store).breaker("svc:1", "/x.v1.X/GetY", policy)


def test_only_one_process_gets_the_half_open_probe(two_stores) -> None:
    stores = two_stores
    policy = Policy(breaker=BreakerPolicy(min_calls=2, open_duration=0.2))
    a, b = (breaker_of(store, policy) for store in stores)
    now = a.clock.monotonic()
    for _ in range(2):
        a.record(a.admit(now), BREAKER_FAILURE, now)
    stores[0].sync_now()
    stores[1].sync_now()
    assert a.state == STATE_OPEN and b.state == STATE_OPEN
    time.sleep(0.25)
    outcomes = []
    for breaker, store in ((a, stores[0]), (b, stores[1])):
        for _ in range(10):  # ask, let the sync grant, ask again
            try:
                outcomes.append((breaker, breaker.admit(breaker.clock.monotonic())))
                break
            except BreakerOpenError:
                store.sync_now()
    assert [t for _, t in outcomes] == [TICKET_PROBE]  # exactly one probe overall
    winner = outcomes[0][0]
    winner.record(TICKET_PROBE, BREAKER_SUCCESS, winner.clock.monotonic())
    for store in stores:
        store.sync_now()
    stores[0].sync_now()
    assert a.state == STATE_CLOSED and b.state == STATE_CLOSED


def test_redis_down_falls_back_to_the_local_breaker() -> None:
    store = SharedBreakerStore(f"redis://127.0.0.1:{free_port()}/0", sync_interval=0.05)
    runtime = Runtime(shared_breakers=store)
    policy = Policy(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(min_calls=2))
    try:
        breaker = runtime.breaker("svc:1", "/x.v1.X/GetY", policy)
        now = breaker.clock.monotonic()
        for _ in range(2):
            breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
        assert breaker.state == STATE_OPEN  # the local window decided
    finally:
        store.close()


def test_an_unused_probe_grant_passes_to_another_process(two_stores) -> None:
    stores = two_stores
    policy = Policy(breaker=BreakerPolicy(min_calls=1, open_duration=0.1))
    a, b = (breaker_of(store, policy) for store in stores)
    now = a.clock.monotonic()
    a.record(a.admit(now), BREAKER_FAILURE, now)
    stores[0].sync_now()
    time.sleep(0.15)
    with pytest.raises(BreakerOpenError):
        a.admit(a.clock.monotonic())  # a asks for the probe...
    stores[0].sync_now()  # ...and is granted it, but never calls again
    stores[1].sync_now()

    def b_probes() -> bool:
        try:
            return b.admit(b.clock.monotonic()) == TICKET_PROBE
        except BreakerOpenError:
            stores[1].sync_now()
            return False

    started = time.monotonic()
    wait_for(b_probes, timeout=5, what="b gets the expired grant")
    assert time.monotonic() - started >= 0.5  # only after a's grant expired


@pytest.mark.failure
def test_shared_breaker_survives_a_redis_restart(redis_factory) -> None:
    redis = redis_factory()
    store = SharedBreakerStore(redis.url, namespace="restart", sync_interval=0.05)
    runtime = Runtime(shared_breakers=store)
    policy = Policy(breaker=BreakerPolicy(min_calls=2, open_duration=30))
    try:
        breaker = runtime.breaker("svc:1", "/x.v1.X/GetY", policy)
        link = breaker.shared
        assert link is not None and link.healthy
        redis.kill()
        wait_for(lambda: not link.healthy, what="the store noticing Redis is down")
        now = breaker.clock.monotonic()
        for _ in range(2):  # the local window decides meanwhile
            breaker.record(breaker.admit(now), BREAKER_FAILURE, now)
        assert breaker.state == STATE_OPEN
        redis.start()  # same port, empty (no persistence)
        wait_for(lambda: link.healthy, what="the store reconnecting")
        # Back on shared state: the failures counted during the outage were handed over, so a
        # replica starting now sees the breaker open too.
        other_store = SharedBreakerStore(redis.url, namespace="restart", sync_interval=0.05)
        try:
            other = Runtime(shared_breakers=other_store).breaker("svc:1", "/x.v1.X/GetY", policy)
            assert other.state == STATE_OPEN
            assert breaker.state == STATE_OPEN
        finally:
            other_store.close()
    finally:
        store.close()


def test_close_leaves_a_redis_client_the_caller_passed_in_to_the_caller(redis_server) -> None:
    import redis

    class Recording(redis.Redis):  # type: ignore[type-arg]
        closed = False

        def close(self) -> None:
            self.closed = True
            super().close()

    theirs = Recording.from_url(redis_server.url)
    try:
        SharedBreakerStore(client=theirs, sync_interval=0.05).close()
        assert not theirs.closed
    finally:
        theirs.close()
    own = SharedBreakerStore(redis_server.url, sync_interval=0.05)
    own.client.__class__ = Recording  # the store's own client is closed with it
    own.close()
    assert own.client.closed  # type: ignore[attr-defined]


def test_slow_calls_in_one_process_open_the_breaker_in_all(two_stores) -> None:
    stores = two_stores
    policy = Policy(breaker=BreakerPolicy(min_calls=4, slow_call_duration=0.1))
    a, b = (breaker_of(store, policy) for store in stores)
    now = a.clock.monotonic()
    for _ in range(4):
        a.record(a.admit(now), BREAKER_SUCCESS, now, 0.5)  # answered, but 5x too slow
    stores[0].sync_now()
    stores[1].sync_now()
    assert a.state == STATE_OPEN and b.state == STATE_OPEN
