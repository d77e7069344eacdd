"""Transport facts that decide whether a request can have left this process.

A call that is not idempotent may be retried only if the server cannot have received it. The
text of a status cannot tell (a server may itself answer UNAVAILABLE "Connection refused": a
relayed downstream error, a database driver's message), so the library asks the transport
*before* it hands such a request over. It is sent only on a channel whose connection is READY;
when there is none, and none becomes ready in the time the attempt has, the library raises
``NotSentError`` itself. That error, created here and never received from anyone, is the only
thing ``pkg.clients.classify`` treats as "never sent".

The same facts tell outlier detection whether a replica failed to answer because its
connection is gone (``connected`` after a failure): a status that arrived on a READY
connection came from the replica, whatever its text says.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import grpc.aio

_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
_SETTLED = (_READY, _FAILED, _SHUTDOWN)
_TIMED_OUT = grpc.StatusCode.DEADLINE_EXCEEDED


class NotSentError(grpc.aio.AioRpcError):
    """The library did not send the request: no connection to the callee was READY.

    A ``grpc.aio.AioRpcError`` (so a ``grpc.RpcError``) with status UNAVAILABLE (no connection
    could be made) or DEADLINE_EXCEEDED (none was made within the attempt's time), so callers'
    handlers treat it like grpc's own errors. Retrying it is safe for any method.
    """

    def __init__(self, target: str, why: str, code: grpc.StatusCode) -> None:
        self.target = target
        self.why = why
        message = f"request to {target} not sent: {why}"
        grpc.aio.AioRpcError.__init__(
            self,
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=message,
            debug_error_string=f"pkg.clients: {message}",
        )

    def __str__(self) -> str:
        return self.details() or "request not sent"

    def __reduce__(self) -> Any:
        return (type(self), (self.target, self.why, self.code()))


def _not_sent(target: str, state: grpc.ChannelConnectivity) -> NotSentError:
    if state is _SHUTDOWN:
        return NotSentError(target, "the channel is closed", grpc.StatusCode.UNAVAILABLE)
    return NotSentError(target, "no connection could be made", grpc.StatusCode.UNAVAILABLE)


async def ensure_ready(
    channel: grpc.aio.Channel,
    target: str,
    timeout: float | None,  # noqa: ASYNC109
) -> None:
    """Return once ``channel`` is READY; else raise ``NotSentError`` (nothing is sent).

    A channel in TRANSIENT_FAILURE (its last connection attempt failed) fails at once, as grpc
    itself fails a call that does not wait for readiness; an IDLE or CONNECTING one gets up to
    ``timeout`` seconds (event-loop time; None: until its connection attempt succeeds or
    fails, as grpc lets a call without deadline wait) to connect.
    """
    state = channel.get_state(False)
    if state is _READY:
        return
    if state is _FAILED or state is _SHUTDOWN:
        raise _not_sent(target, state)
    state = channel.get_state(True)
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    while state not in _SETTLED:
        left = None if end is None else end - loop.time()
        if left is not None and left <= 0:
            break
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        except TimeoutError:
            break
        state = channel.get_state(False)
    if state is _READY:
        return
    if state in _SETTLED:
        raise _not_sent(target, state)
    raise NotSentError(
        target, f"not connected within {timeout}s", grpc.StatusCode.DEADLINE_EXCEEDED
    )


def connected(channel: Any) -> bool:
    """Whether ``channel`` (asyncio or blocking) has a READY connection now.

    Unknown (a channel type without a connectivity state) counts as connected: the caller then
    never concludes that a request was not sent.
    """
    if isinstance(channel, grpc.aio.Channel):
        return channel.get_state(False) is _READY
    state = sync_state(channel)
    return state is None or state is _READY


# -- blocking channels -------------------------------------------------------------------------

# Blocking channels expose their connectivity only through grpc's C-core channel object (the
# public ``subscribe`` API starts a polling thread per channel). Without it the gate cannot
# tell, and requests are sent as if connected (so never counted as "not sent").
_SYNC_STATES = {
    state.value[0]: state for state in grpc.ChannelConnectivity if isinstance(state.value, tuple)
}
_SYNC_POLL_S = 0.005


def sync_state(channel: Any, try_to_connect: bool = False) -> grpc.ChannelConnectivity | None:
    """The connectivity state of a blocking ``grpc.Channel`` (None when it cannot be read)."""
    core = getattr(channel, "_channel", None)
    check = getattr(core, "check_connectivity_state", None)
    if check is None:
        return None
    try:
        return _SYNC_STATES.get(int(check(try_to_connect)))
    except Exception:  # a closed channel, or a grpc version without this method
        return None


def ensure_ready_sync(channel: Any, target: str, timeout: float | None) -> None:
    """Blocking twin of ``ensure_ready`` (polls the state while connecting)."""
    state = sync_state(channel)
    if state is None or state is _READY:
        return
    if state is _FAILED or state is _SHUTDOWN:
        raise _not_sent(target, state)
    state = sync_state(channel, True)
    end = float("inf") if timeout is None else time.monotonic() + timeout
    while state not in _SETTLED and state is not None and time.monotonic() < end:
        time.sleep(_SYNC_POLL_S)
        state = sync_state(channel)
    if state is None or state is _READY:
        return
    if state in _SETTLED:
        raise _not_sent(target, state)
    raise NotSentError(
        target, f"not connected within {timeout}s", grpc.StatusCode.DEADLINE_EXCEEDED
    )
