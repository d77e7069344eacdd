"""Open control streams on this replica, and commands with request ids awaiting acks.

One ``Session`` per connected node. Commands are queued on the session's outbox; the caller
awaits the node's ack (matched by request id) or a timeout. A newer stream for the same node
replaces the old one, which is closed and its pending commands failed. No wire types leak out
of here except the queued messages themselves, which the stream handler writes as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from api_balancing import errors


@dataclass(frozen=True)
class Ack:
    request_id: str
    ok: bool
    message: str


@dataclass(frozen=True)
class Closed:
    """Put on an outbox to end the stream with a status (code name, message)."""

    code: str
    message: str


@dataclass(frozen=True)
class Ended:
    """Put on an outbox to end the stream with OK: the node was told to move (``hand_over``)."""


ENDED = Ended()


class Outbox(Protocol):
    """What a control stream's outgoing messages are queued on (``Mailbox``, or a plain
    ``asyncio.Queue`` in tests)."""

    def put_nowait(self, item: Any) -> None: ...

    def qsize(self) -> int: ...

    async def get(self) -> Any: ...


class Mailbox:
    """An unbounded queue with one reader: a control stream's outbox.

    ``asyncio.Queue`` carries three deques and an ``Event`` (~3 KB per stream, measured at
    fleets of 1,000-10,000 nodes); a stream has a single reader (its handler) and rarely more than
    a message or two queued, so a list and one waiter future are enough.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


@dataclass(eq=False)
class Session:
    """One node's open control stream on this replica."""

    node_id: str
    serial: int
    outbox: Outbox = field(default_factory=Mailbox)
    pending: dict[str, asyncio.Future[Ack]] = field(default_factory=dict)
    closed: bool = False
    # Ended by a hand-over (the node was told where to reconnect): its record stays connected
    # and routable while the node moves, only the ownership is let go.
    handed_over: bool = False

    def hand_over(self, message: Any) -> bool:
        """Send ``message`` (a Reconnect) and end the stream with OK; False when already closed."""
        if self.closed:
            return False
        self.closed = self.handed_over = True
        self.outbox.put_nowait(message)
        self.outbox.put_nowait(ENDED)
        self.fail_pending(f"node {self.node_id!r} is moving to another Foghorn replica")
        return True

    def close(self, code: str, message: str) -> None:
        """End this stream (the handler aborts with ``code``) and fail its pending commands."""
        if self.closed:
            return
        self.closed = True
        self.outbox.put_nowait(Closed(code, message))
        self.fail_pending(f"node {self.node_id!r}: {message}")

    def fail_pending(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(errors.FailedPrecondition(message, "node_id"))
        self.pending.clear()

    def resolve(self, ack: Ack) -> bool:
        """Hand an ack to the caller waiting for it; False when nobody waits (late or unknown)."""
        future = self.pending.pop(ack.request_id, None)
        if future is None or future.done():
            return False
        future.set_result(ack)
        return True


class SessionRegistry:
    """Which node streams this replica holds, and command dispatch to them."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._serial = itertools.count(1)
        self.acks_unmatched = 0
        self._emptied: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, node_id: str, outbox: Outbox | None = None) -> Session:
        """A node registered on a stream: it becomes the current one, replacing any older."""
        session = Session(node_id, next(self._serial), outbox if outbox is not None else Mailbox())
        old = self._sessions.get(node_id)
        self._sessions[node_id] = session
        if old is not None:
            old.close("ABORTED", "replaced by a newer control stream for this node")
        return session

    def is_current(self, session: Session) -> bool:
        return self._sessions.get(session.node_id) is session

    def release(self, session: Session) -> bool:
        """The stream ended; True when it was the node's current stream (so it is now gone)."""
        session.closed = True
        session.fail_pending(f"node {session.node_id!r} disconnected before acknowledging")
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            if not self._sessions and self._emptied is not None:
                self._emptied.set()
            return True
        return False

    async def wait_empty(self) -> None:
        """Return once no stream is open here (a stopping replica's nodes have moved)."""
        while self._sessions:
            self._emptied = asyncio.Event()
            await self._emptied.wait()

    def get(self, node_id: str) -> Session | None:
        return self._sessions.get(node_id)

    def connected_ids(self) -> list[str]:
        return list(self._sessions)

    async def send(self, node_id: str, make_message: Any, timeout_s: float) -> Ack:
        """Queue ``make_message(request_id)`` to the node and wait for its ack.

        Raises FailedPrecondition (not connected here / disconnected meanwhile) or
        CommandTimeout.
        """
        session = self._sessions.get(node_id)
        if session is None or session.closed:
            raise errors.FailedPrecondition(
                f"node_id: node {node_id!r} has no control stream on this replica", "node_id"
            )
        request_id = uuid.uuid4().hex
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future
        session.outbox.put_nowait(make_message(request_id))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise errors.CommandTimeout(
                f"node {node_id!r} did not acknowledge command {request_id} within {timeout_s:g} s"
            ) from None
        finally:
            session.pending.pop(request_id, None)

    def open_sessions(self) -> list[Session]:
        """The current streams that are still open (not closed nor handed over)."""
        return [s for s in self._sessions.values() if not s.closed]

    def broadcast(self, message: Any) -> int:
        """Queue ``message`` on every open stream; how many got it."""
        sessions = self.open_sessions()
        for session in sessions:
            session.outbox.put_nowait(message)
        return len(sessions)

    def close_all(self, message: str) -> None:
        for session in list(self._sessions.values()):
            session.close("UNAVAILABLE", message)
        self._sessions.clear()
