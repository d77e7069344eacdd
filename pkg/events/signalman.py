"""An ``EventSink`` that hands events to Signalman's ``Publish`` RPC (through ``pkg.clients``).

This is how events travel on the embedded platform, where no Kafka runs: Signalman in embedded
mode takes events over ``Publish`` and serves them to subscribers as it would from its topic.
Like the Kafka sink, ``emit`` never blocks and never raises: events wait in a bounded buffer (the
oldest kept, new ones dropped and counted when it is full) while one sender task on the caller's
event loop publishes them in order, in batches, backing off while Signalman is unreachable.

Delivery is at least once: a ``Publish`` that timed out may have landed, and is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence

import grpc
import grpc.aio
import structlog

from pkg.clients.backoff import Backoff
from pkg.clients.signalman import SignalmanClient, default_policy
from pkg.events.envelope import encode_event
from pkg.events.sink import Event, SinkState

log = structlog.get_logger("pkg.events.signalman")

# Refusals that sending again cannot cure (bad credential, a replica that consumes Kafka, an
# event Signalman rejects): the batch is dropped and counted, and the reason shown in health.
_PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class SignalmanSink:
    """Publish events to Signalman replicas ``targets`` with ``token`` (a `system` credential)."""

    def __init__(
        self,
        targets: Sequence[str],
        token: str,
        *,
        source: str = "",
        buffer_size: int = 10_000,
        max_batch: int = 500,
        timeout_s: float = 2.0,
        client: SignalmanClient | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._client = client or SignalmanClient(
            list(targets),
            token=token or None,
            policy=default_policy(timeout_s),
            credentials=credentials,
        )
        self.source = source
        self.buffer_size = buffer_size
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._buffer: deque[Event] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = True  # no failure seen yet
        self.reason = ""
        self.sent = 0
        self.dropped = 0

    def emit(self, event: Event) -> None:
        """Buffer ``event``; drop and count it when the buffer is full. Call on the event loop."""
        try:
            if self._closing or len(self._buffer) >= self.buffer_size:
                self.dropped += 1
                return
            if self.source and not event.source:
                event = Event(event.type, event.tenant, event.data, event.id, event.time,
                              event.schema_version, self.source)  # fmt: skip
            self._buffer.append(event)
            if self._task is None:
                self._wake = asyncio.Event()
                self._task = asyncio.get_running_loop().create_task(
                    self._send_forever(), name="signalman-sink"
                )
            if self._wake is not None:
                self._wake.set()
        except Exception:  # emit must never fail its caller
            self.dropped += 1

    def state(self) -> SinkState:
        return SinkState(
            "signalman",
            connected=self.connected,
            buffered=len(self._buffer),
            dropped=self.dropped,
            sent=self.sent,
            reason=self.reason,
        )

    async def _send_forever(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        wake = self._wake
        assert wake is not None
        while True:
            if not self._buffer:
                if self._closing:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch = [self._buffer[i] for i in range(min(len(self._buffer), self.max_batch))]
            try:
                await self._client.publish(
                    [encode_event(e).decode() for e in batch], deadline_s=self.timeout_s
                )
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _PERMANENT:
                    self._drop(len(batch), f"Signalman refused events: {exc.code().name}: "
                                           f"{exc.details()}")  # fmt: skip
                    continue
                self._unreachable(f"{exc.code().name}: {exc.details()}")
            except Exception as exc:
                self._unreachable(f"{type(exc).__name__}: {exc}")
            else:
                for _ in batch:
                    self._buffer.popleft()
                self.sent += len(batch)
                if not self.connected:
                    log.info("signalman_sink_connected")
                self.connected, self.reason = True, ""
                backoff.reset()
                continue
            if self._closing:
                return
            await asyncio.sleep(backoff.next_delay())

    def _unreachable(self, why: str) -> None:
        if self.connected:
            log.warning("signalman_sink_unreachable", error=why[:200])
        self.connected = False
        self.reason = (
            f"Signalman unreachable ({why[:120]}): events wait in a bounded buffer "
            "(dropped, counted, when full)"
        )

    def _drop(self, n: int, why: str) -> None:
        for _ in range(n):
            self._buffer.popleft()
        self.dropped += n
        self.reason = why[:200]
        log.error("signalman_sink_dropped", events=n, reason=why[:200])

    async def aclose(self) -> None:
        """Send what is buffered for up to one timeout, then stop; what is left is dropped."""
        self._closing = True
        task = self._task
        if task is not None:
            if self._wake is not None:
                self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._buffer:
            self.dropped += len(self._buffer)
            log.warning("signalman_sink_dropped_at_close", events=len(self._buffer))
            self._buffer.clear()
        await self._client.close()
