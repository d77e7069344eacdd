"""A burst of subscribes on one replica with a Redis history, as a failover sends a survivor."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from typing import Any

from pkg.clients.signalman import SignalmanClient, Subscription
from pkg.devstack.servers import CommandProcess, free_port
from pkg.proto.signalman.v1 import signalman_pb2 as pb
from tests.signalman.conftest import event_json

TENANTS = [f"burst{i}" for i in range(20)]
PER_TENANT = 50  # 1,000 subscribes, half of them resuming from an offset


async def test_1000_concurrent_subscribes_on_one_replica_all_succeed(
    redis_server: Any, process_factory: Callable[..., CommandProcess]
) -> None:
    replica = process_factory(
        "signalman",
        [sys.executable, "-m", "api_realtime", "--grpc-port", "{port}",
         "--http-port", str(free_port())],
        env={
            "PLATFORM_TOKENS": ",".join(
                [*(f"k{t}=u@{t}:tenant-user" for t in TENANTS), "kpub=publisher:system"]
            ),
            "SIGNALMAN_REDIS_URL": redis_server.url,
            "SIGNALMAN_REDIS_PREFIX": f"burst{uuid.uuid4().hex[:6]}",
            "SIGNALMAN_MAX_CONNECTIONS_PER_TENANT": str(PER_TENANT),
            "LOG_LEVEL": "WARNING",
        },
    )  # fmt: skip
    clients = [SignalmanClient(f"127.0.0.1:{replica.port}", token=f"k{t}") for t in TENANTS]
    publisher = SignalmanClient(f"127.0.0.1:{replica.port}", token="kpub")  # system role
    subs: list[Subscription] = []
    try:
        # Three events per tenant already in history: the resuming half replays two of them.
        epochs = {}
        for tenant, client in zip(TENANTS, clients, strict=True):
            await publisher.publish([event_json(tenant, n=n) for n in range(3)])
            probe = client.subscribe(["all"], resume_from={"all": ("", 0)})
            async with probe:
                first = await probe.get(5.0)
                assert isinstance(first, pb.Event)
                epochs[tenant] = first.epoch
        for tenant, client in zip(TENANTS, clients, strict=True):
            for i in range(PER_TENANT):
                resume = {"all": (epochs[tenant], 1)} if i % 2 else None
                subs.append(client.subscribe(["all"], resume_from=resume))
        for sub in subs:
            sub.start()  # every Subscribe call is opened at once
        await asyncio.gather(*(sub.wait_subscribed(60.0) for sub in subs))
        # Each subscribe succeeded on its first connection: none was refused and retried.
        assert [s.stats.last_error for s in subs if s.stats.connects != 1] == []
        for tenant in TENANTS:
            await publisher.publish([event_json(tenant, n=3)])
        for index, sub in enumerate(subs):
            want = [2, 3, 4] if index % 2 else [4]  # replay after offset 1, then the live one
            got = [(await sub.get(20.0)) for _ in want]
            assert [e.offset for e in got if isinstance(e, pb.Event)] == want
            assert sub.stats.reconnects == 0
    finally:
        for sub in subs:
            await sub.close()
        for client in [*clients, publisher]:
            await client.close()
