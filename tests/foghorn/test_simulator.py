"""The simulated edge node: valid reports, and it obeys every command it gets."""

from __future__ import annotations

from api_balancing import validation
from api_balancing.simulator import build_fleet
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb


def busy_node():  # type: ignore[no-untyped-def]
    node = build_fleet(1, seed=3)[0]
    for _ in range(30):
        node.tick()
    assert node.viewers > 0
    return node


def test_simulated_fleet_is_spread_out_and_every_message_validates() -> None:
    fleet = build_fleet(50, seed=1)
    assert len({n.node_id for n in fleet}) == 50
    assert len({n.region for n in fleet}) > 10
    for node in fleet:
        validation.register(node.register())
        for _ in range(20):
            node.tick()
            validation.report(node.report())  # raises on anything Foghorn would reject
            assert node.viewers <= node.capacity


def test_draining_node_sheds_viewers_until_none_are_left() -> None:
    node = busy_node()
    ack = node.apply(pb.Command(request_id="r1", set_mode=pb.SetModeCommand(mode=2)))
    assert ack.ok and ack.request_id == "r1"
    counts = []
    for _ in range(40):
        node.tick()
        counts.append(node.viewers)
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


def test_maintenance_drops_everything_and_normal_resumes() -> None:
    node = busy_node()
    node.apply(pb.Command(request_id="r", set_mode=pb.SetModeCommand(mode=3)))
    node.tick()
    assert node.viewers == 0 and not node.streams
    node.apply(pb.Command(request_id="r", set_mode=pb.SetModeCommand(mode=1)))
    for _ in range(30):
        node.tick()
    assert node.viewers > 0


def test_stop_sessions_and_drain_commands() -> None:
    node = busy_node()
    stream_id = next(iter(node.streams))
    ack = node.apply(
        pb.Command(request_id="s", stop_sessions=pb.StopSessionsCommand(stream_id=stream_id))
    )
    assert ack.ok and stream_id not in node.streams
    target = node.viewers // 2
    node.apply(pb.Command(request_id="d", drain=pb.DrainCommand(target_viewers=target)))
    seen = []
    for _ in range(40):
        node.tick()
        seen.append(node.viewers)
    assert min(seen) <= target  # shed down to the target (then serves normally again)
    assert not node.apply(pb.Command(request_id="x")).ok  # empty command: refused, not crashed
