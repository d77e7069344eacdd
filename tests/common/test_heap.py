"""HeapKeeper: when it freezes the heap and when it sweeps frozen cycles (pure logic, fake gc)."""

from __future__ import annotations

from pkg.common.clock import FakeClock
from pkg.common.heap import HeapKeeper


class FakeGc:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self) -> int:
        self.calls.append("collect")
        return 0


def keeper(held: list[int], clock: FakeClock, fake: FakeGc) -> HeapKeeper:
    return HeapKeeper(
        lambda: held[0], min_growth=200, growth=0.1, sweep_every_s=60.0, clock=clock,
        freeze=fake.freeze, unfreeze=fake.unfreeze, collect=fake.collect,
    )  # fmt: skip


def test_freezes_after_a_burst_of_long_lived_objects_only() -> None:
    held, clock, fake = [0], FakeClock(), FakeGc()
    k = keeper(held, clock, fake)
    held[0] = 199
    assert k.check() is None  # under the minimum growth
    held[0] = 5_000
    assert k.check() == "freeze"
    held[0] = 5_400  # +8%: under the fraction of what is frozen
    assert k.check() is None
    held[0] = 5_500
    assert k.check() == "freeze"
    assert fake.calls == ["freeze", "freeze"]


def test_regrowth_after_a_fall_counts_from_the_low_point() -> None:
    held, clock, fake = [5_000], FakeClock(), FakeGc()
    k = keeper(held, clock, fake)
    held[0] = 2_000  # half of the subscribers left
    assert k.check() is None
    held[0] = 2_250  # they come back: what is new is not frozen yet
    assert k.check() == "freeze"


def test_sweeps_frozen_cycles_once_per_interval_and_only_after_a_freeze() -> None:
    held, clock, fake = [0], FakeClock(), FakeGc()
    k = keeper(held, clock, fake)
    clock.advance(120)
    assert k.check() is None  # nothing frozen since start: nothing to sweep
    held[0] = 1_000
    assert k.check() == "freeze"
    clock.advance(59)
    assert k.check() is None
    clock.advance(1)
    assert k.check() == "sweep"
    assert fake.calls == ["freeze", "unfreeze", "collect", "freeze"]
    clock.advance(600)
    assert k.check() is None  # no freeze since the sweep
    assert (k.freezes, k.sweeps) == (1, 1)
