"""Replica sets that change without restarting the caller: a watched file, a DNS name
re-resolved (periodically and after failures), a list fed by hand; real test service
processes behind them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pkg.clients import OutlierPolicy, Policy, RetryPolicy, aio_channel
from pkg.clients.discovery import DnsTargets, FileTargets, dynamic_targets, parse_address_file
from pkg.clients.grpc_aio import ResilientChannel
from pkg.clients.targets import TargetList
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc
from tests.clients.conftest import TESTSVC, addresses
from tests.waiting import eventually

pytestmark = [pytest.mark.integration]


def policy() -> Policy:
    return Policy(
        timeout=3.0,
        retry=RetryPolicy(
            max_attempts=3,
            base_backoff=0.01,
            max_backoff=0.05,
            attempt_timeouts=((TESTSVC, 0.5),),
            idempotent_methods=(TESTSVC,),
        ),
        outlier=OutlierPolicy(health_check_interval=0.3),
    )


class Traffic:
    """Calls one after another in the background; which replica answered each, and failures."""

    def __init__(self, stub: pb_grpc.TestServiceStub) -> None:
        self.stub = stub
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        i = 0
        while True:
            i += 1
            try:
                reply = await self.stub.Unary(pb.UnaryRequest(key=f"t-{i}"), timeout=3.0)
                self.answers.append(reply.server_id)
            except Exception as exc:
                self.failures.append(exc)
            await asyncio.sleep(0.01)

    def recent(self, n: int = 10) -> set[str]:
        return set(self.answers[-n:])

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        await eventually(predicate, timeout=10.0, what=what)

    async def stop(self) -> None:
        self._task.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await self._task


async def test_a_watched_file_adds_a_new_replica_and_drops_a_removed_one(
    replica_pair, tmp_path: Path
) -> None:
    address_a, address_b = addresses(*replica_pair)
    listing = tmp_path / "replicas.txt"
    listing.write_text(f"# testsvc replicas\n{address_a}\n")
    targets = FileTargets(listing, interval=0.2)
    channel = aio_channel(targets, policy())
    assert isinstance(channel, ResilientChannel) and channel.pool is not None
    traffic = Traffic(pb_grpc.TestServiceStub(channel))
    await traffic.until(lambda: len(traffic.answers) >= 5, "first answers")
    assert set(traffic.answers) == {"a"}
    listing.write_text(f"{address_a}\n{address_b}\n")  # a replica joins
    await traffic.until(lambda: traffic.recent() == {"a", "b"}, "b joins the rotation")
    listing.write_text(f"{address_b}  # a left\n")  # a replica is removed
    await traffic.until(lambda: traffic.recent() == {"b"}, "a leaves the rotation")
    assert address_a not in channel.pool.channels
    await traffic.stop()
    assert traffic.failures == []  # no call failed while the set changed
    await channel.close()


async def test_a_dns_name_is_re_resolved_periodically_and_after_failures(
    replica_pair, tmp_path: Path
) -> None:
    # The resolver seam maps the name through a file (no /etc/hosts edits); the servers and
    # the calls are real.
    a, _ = replica_pair
    address_a, address_b = addresses(*replica_pair)
    zone = tmp_path / "zone.json"

    def publish(*records: str) -> None:
        zone.write_text(json.dumps({"testsvc.internal": list(records)}))

    def resolver(host: str, port: int) -> list[str]:
        return list(json.loads(zone.read_text())[host])

    publish(address_a)
    targets = DnsTargets("testsvc.internal", 7000, resolver=resolver, interval=0.3)
    assert targets.name == "dns:///testsvc.internal:7000"
    channel = aio_channel(targets, policy())
    traffic = Traffic(pb_grpc.TestServiceStub(channel))
    publish(address_a, address_b)  # periodic re-resolution finds the new replica
    await traffic.until(lambda: traffic.recent() == {"a", "b"}, "b joins the rotation")
    # Re-resolution after failures: with the periodic refresh an hour away, a replica that
    # dies and leaves the name is dropped as soon as calls fail to reach it.
    targets.interval = 3600.0
    # One more periodic refresh, and the loop waits on the long interval.
    settled = targets.refreshes
    await eventually(lambda: targets.refreshes > settled, timeout=5, what="the last short refresh")
    before = targets.refreshes
    publish(address_b)
    a.kill()
    await traffic.until(lambda: targets.addresses == (address_b,), "a dropped after failures")
    assert targets.refreshes > before
    await traffic.until(lambda: traffic.recent() == {"b"}, "only b answers")
    await traffic.stop()
    assert traffic.failures == []
    await channel.close()


async def test_a_dns_target_resolves_through_the_system_resolver(replica_pair) -> None:
    port = replica_pair[0].port
    channel = aio_channel(f"dns:///localhost:{port}", policy())
    assert isinstance(channel, ResilientChannel) and channel.pool is not None
    # What getaddrinfo gives for localhost here (127.0.0.1, and ::1 where /etc/hosts has it).
    assert f"127.0.0.1:{port}" in channel.pool.targets.addresses
    stub = pb_grpc.TestServiceStub(channel)
    reply = await stub.Unary(pb.UnaryRequest(key="dns"), timeout=3.0)
    assert reply.server_id == "a"
    await channel.close()


async def test_a_list_fed_by_hand_moves_calls_to_the_replicas_it_names(replica_pair) -> None:
    # The seam a Foghorn control stream uses to tell its nodes the current replicas.
    address_a, address_b = addresses(*replica_pair)
    targets = TargetList([address_a], name="testsvc")
    channel = aio_channel(targets, policy())
    traffic = Traffic(pb_grpc.TestServiceStub(channel))
    await traffic.until(lambda: len(traffic.answers) >= 3, "first answers")
    assert targets.update([address_b])
    await traffic.until(lambda: traffic.recent() == {"b"}, "calls move to b")
    assert not targets.update([address_b])  # the same set: no change
    await traffic.stop()
    assert traffic.failures == []
    await channel.close()


def test_target_specs_and_address_files_are_checked() -> None:
    assert parse_address_file("# c\n127.0.0.1:1, 127.0.0.1:2\n\n[::1]:3 # v6\n") == [
        "127.0.0.1:1",
        "127.0.0.1:2",
        "[::1]:3",
    ]
    assert dynamic_targets("127.0.0.1:1") is None
    assert dynamic_targets(["127.0.0.1:1", "127.0.0.1:2"]) is None
    with pytest.raises(ValueError, match="cannot be read"):
        dynamic_targets("file:/nonexistent/replicas.txt")
    with pytest.raises(ValueError, match="dns:///name:port"):
        dynamic_targets("dns://8.8.8.8/svc:1")
    with pytest.raises(ValueError, match="IP literals"):
        TargetList(["svc.internal:1"])
    targets = TargetList(["localhost:1", "127.0.0.1:1"])
    assert targets.addresses == ("127.0.0.1:1",)
    with pytest.raises(ValueError):
        targets.update(["not an address"])
    assert targets.addresses == ("127.0.0.1:1",)  # a bad update changes nothing
    started = time.monotonic()
    assert DnsTargets("localhost", 1).addresses[0] == "127.0.0.1:1"
    assert time.monotonic() - started < 5


def test_one_list_per_spec_is_shared_while_in_use(tmp_path: Path) -> None:
    listing = tmp_path / "replicas"
    listing.write_text("127.0.0.1:1\n")
    first = dynamic_targets(f"file:{listing}")
    assert dynamic_targets([f"file:{listing}"]) is first  # no second read or refresh task
    assert dynamic_targets("dns:///localhost:1") is dynamic_targets("dns:///localhost:1")
