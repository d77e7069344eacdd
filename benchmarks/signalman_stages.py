"""A Signalman replica with per-event stage timestamps (``./dev bench signalman-fanout --stages``).

Runs ``api_realtime`` as usual, with a few of its functions wrapped to note the wall-clock time at
which each event of a subscribed tenant passes a stage, beside the event's own time (set by its
producer): where an event's delivered latency goes, event by event, instead of the replicas'
``signalman_event_age_seconds`` buckets (whose bounds at 0.25, 0.5, 1 and 2.5 s are all a p99
says). Stages, in order:

* ``fetched``: aiokafka's ``getmany`` handed the record over (the consumer's read-ahead);
* ``processing``: the batch holding it started processing (it waited behind the batch before);
* ``appended``: its batch's history append returned (owning replica only);
* ``dispatched``: the tail (``XREAD`` over every tenant's stream) handed it to the tenant's
  sessions (every replica with subscribers of the tenant);
* ``written``: a session's writer took it from the session's queue to write it to its stream.

Plus ``loop_lag``: how late a 5 ms sleep of a task of the replica's loop wakes up (the loop's
ready queue, or the process waiting for a core), and ``gc``: how long each collection of the
oldest generation took (it stops the loop). Timestamps are ``time.time()`` in the replica,
compared with times taken in other processes of the same machine (the producer's event time, the
subscriber's receipt). The cost: a clock reading per batch, per dispatched entry and per write,
a JSON decode per consumed record of a subscribed tenant: ``--stages`` runs say so in their JSON
and are not the ones whose CPU figures count.

``SIGUSR2`` writes what was noted since the last ``SIGUSR2`` to ``BENCH_STAGES_FILE`` (JSON)
and starts again: the benchmark signals before and after the phase it reads.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time
from typing import Any

# Only subscribed tenants are noted (the consume-only phase's tenants are "idle...").
_SKIP = b'"idle'
STAGES = ("fetched", "processing", "appended", "dispatched", "written")
_samples: dict[str, list[tuple[float, float]]] = {
    s: [] for s in (*STAGES, "loop_lag", "gc", "gc_young")
}
_gc_started = [0.0]
_got_at: dict[tuple[int, int], float] = {}
_event_time: dict[int, float] = {}  # id(Entry) -> event time, from dispatch to its writes


def _note(stage: str, event_time: float, at: float) -> None:
    _samples[stage].append((event_time, at))


def _dump(_signum: int, _frame: Any) -> None:
    path = os.environ["BENCH_STAGES_FILE"]
    doc = {k: list(v) for k, v in _samples.items()}
    for v in _samples.values():
        v.clear()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _gc(phase: str, info: dict[str, int]) -> None:
    """Garbage collections: of the oldest generation (when it ended, how long it took, ms) in
    ``gc``, of the younger ones that took 5 ms or more in ``gc_young``."""
    now = time.perf_counter()
    if phase == "start":
        _gc_started[0] = now
        return
    took = (now - _gc_started[0]) * 1000
    if info.get("generation") == 2:
        _samples["gc"].append((time.time(), took))
    elif took >= 5:
        _samples["gc_young"].append((time.time(), took))


def install() -> None:
    from aiokafka import AIOKafkaConsumer

    from api_realtime import handlers
    from signalman.hub import Hub
    from signalman.processor import Processor

    getmany = AIOKafkaConsumer.getmany

    async def traced_getmany(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = await getmany(self, *args, **kwargs)
        now = time.time()
        for tp, records in out.items():
            for r in records:
                _got_at[(tp.partition, r.offset)] = now
        return out

    AIOKafkaConsumer.getmany = traced_getmany

    handle_batch = Processor.handle_batch

    async def traced_handle_batch(self: Any, records: list[Any], *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        out = await handle_batch(self, records, *args, **kwargs)
        done = time.time()
        for rec in records:
            got = _got_at.pop((rec.source.partition, rec.source.offset), None)
            if rec.value is None or _SKIP in rec.value:
                continue
            obj = json.loads(rec.value)
            event_time = float(obj["time"]) if "time" in obj else float(obj["batch"][0]["time"])
            if got is not None:
                _note("fetched", event_time, got)
            _note("processing", event_time, started)
            _note("appended", event_time, done)
        return out

    Processor.handle_batch = traced_handle_batch  # type: ignore[method-assign]

    dispatch = Hub._dispatch

    async def traced_dispatch(self: Any, feed: Any, entries: list[Any]) -> None:
        now = time.time()
        for entry in entries:
            t = entry.time
            _event_time[id(entry)] = t
            _note("dispatched", t, now)
        if len(_event_time) > 100_000:
            _event_time.clear()
        await dispatch(self, feed, entries)

    Hub._dispatch = traced_dispatch  # type: ignore[method-assign]

    events_message = handlers.events_message  # type: ignore[attr-defined]

    def traced_events_message(events: list[Any]) -> bytes:
        now = time.time()
        for e in events:
            t = _event_time.get(id(e.entry))
            _note("written", e.entry.time if t is None else t, now)
        return events_message(events)

    handlers.events_message = traced_events_message  # type: ignore[attr-defined]
    signal.signal(signal.SIGUSR2, _dump)
    gc.callbacks.append(_gc)


async def _loop_lag() -> None:
    while True:
        due = time.perf_counter() + 0.005
        await asyncio.sleep(0.005)
        now = time.time()
        _samples["loop_lag"].append((now, (time.perf_counter() - due) * 1000))


def main() -> int:
    install()
    import api_realtime.__main__ as replica

    started = replica._started
    tasks: list[asyncio.Task[None]] = []

    def traced_started(app: Any) -> None:
        tasks.append(asyncio.get_running_loop().create_task(_loop_lag()))
        started(app)

    replica._started = traced_started
    return replica.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
