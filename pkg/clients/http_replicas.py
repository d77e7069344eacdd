"""Several replicas behind one ``AsyncHttpClient``: picking, per-replica breakers, HTTP health.

``AsyncHttpClient(base_url="http://bridge", replicas=[...])`` sends every attempt to a replica
picked by the outlier detector (``pkg.clients.outlier``), as ``aio_channel`` does for gRPC:
round robin over the replicas in rotation, a retry on another replica, connection failures and
hung attempts (2 in a row) or 502/503/504 answers (5 in a row) eject a replica, ejected
replicas are tried when every one in rotation fails, and a replica out of rotation is checked
with ``GET <health_path>`` every ``outlier.health_check_interval`` and re-admitted on a 2xx.
Each replica has its own breaker (named ``scheme://ip:port``); the retry budget is the
client's. ``replicas`` may be a list, ``dns:///name:port``, ``file:/path`` or a
``TargetList``; the base URL gives the scheme and the ``Host`` header every request carries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from pkg.clients.breaker import BREAKER_IGNORE, BREAKER_SUCCESS, TICKET_NORMAL, CircuitBreaker
from pkg.clients.classify import HTTP_RETRYABLE_STATUS, Verdict
from pkg.clients.discovery import dynamic_targets
from pkg.clients.engine import EJECTED_REPLICA_ATTR
from pkg.clients.outlier import (
    EJECTED,
    OUTCOME_ERROR,
    OUTCOME_LOCAL,
    Replica,
)
from pkg.clients.policy import Policy
from pkg.clients.replicas import HealthChecker, pick_admitted
from pkg.clients.runtime import MethodState, Runtime
from pkg.clients.targets import TargetList, _split_host_port

# Statuses that say the replica itself is in trouble (not the request): they count towards
# its ejection. 429 is the replica protecting itself: alive, so it does not.
_REPLICA_ERRORS = frozenset({502, 503, 504})


class HttpReplicas:
    """The replica set of one HTTP client, its detector, breakers and health checker."""

    def __init__(
        self,
        replicas: str | Sequence[str] | TargetList,
        policy: Policy,
        runtime: Runtime,
        client: httpx.AsyncClient,
        scheme: str,
        health_path: str,
    ) -> None:
        if not health_path.startswith("/"):
            raise ValueError(f"health_path must be an absolute path, got {health_path!r}")
        found = dynamic_targets(replicas)
        dynamic = found is not None
        if found is None:
            assert not isinstance(replicas, TargetList)  # a TargetList is dynamic
            items = replicas.split(",") if isinstance(replicas, str) else list(replicas)
            found = TargetList([item.strip() for item in items if item.strip()])
        self.targets = found
        self.scheme = scheme
        self.name = f"{scheme}://{found.name}"
        self.policy = policy
        self.runtime = runtime
        self._client = client
        self._health_path = health_path
        self.detector = runtime.detector(self.name, found.addresses, policy.outlier, dynamic)
        if dynamic:
            if self.detector.addresses != list(found.addresses):
                self.detector.set_addresses(found.addresses)
            found.subscribe(self.detector.set_addresses)
        outlier = policy.outlier
        self.checker = (
            HealthChecker(
                self.detector,
                runtime,
                outlier.health_check_interval,
                self._serving,
                lambda address: address in self.targets.addresses,
                self.authority,
            )
            if outlier.health_check
            else None
        )
        self._timeout = outlier.health_check_timeout
        found.acquire()
        self.started = False

    def authority(self, address: str) -> str:
        """``scheme://ip:port`` of a replica: its breaker's name."""
        return f"{self.scheme}://{address}"

    def breaker(self, address: str, method: str) -> CircuitBreaker | None:
        """The breaker of one replica (per method when the policy says so)."""
        if not self.policy.breaker.enabled:
            return None
        return self.runtime.breaker(self.authority(address), method, self.policy)

    def wake_checker(self) -> None:
        if self.checker is not None:
            self.checker.wake()

    async def _serving(self, address: str) -> bool:
        url = f"{self.authority(address)}{self._health_path}"
        response = await self._client.get(url, timeout=self._timeout)
        return 200 <= response.status_code < 300

    def attempt_fn(
        self,
        request: httpx.Request,
        send_options: dict[str, Any],
        state: MethodState,
        classify: Any,
        retryable_status: Callable[[httpx.Response], Exception],
    ) -> Any:
        """The attempt function of one request: each attempt on a picked replica; a status
        worth retrying is raised as ``retryable_status(response)``."""
        if not self.started:
            self.started = True
            self.targets.start()
        detector = self.detector
        client = self._client
        clock = state.clock
        cap = state.attempt_timeout
        base = request.url
        method = state.method
        failed: list[Replica | None] = [None]

        def breaker_of(address: str) -> CircuitBreaker | None:
            return self.breaker(address, method)

        def record(
            breaker: CircuitBreaker | None, ticket: int, verdict: Verdict, t0: float
        ) -> None:
            if breaker is not None and (
                verdict.breaker != BREAKER_IGNORE or ticket != TICKET_NORMAL
            ):
                now = clock.monotonic()
                breaker.record(ticket, verdict.breaker, now, now - t0)

        async def attempt(attempt_timeout: float) -> httpx.Response:
            r, breaker, ticket, error = pick_admitted(
                detector, failed[0], breaker_of, clock.monotonic, self.wake_checker
            )
            if r is None:
                if error is not None:
                    raise error
                self.targets.refresh_soon()
                raise httpx.ConnectError(f"no replica address known for {self.name}")
            host, port = _split_host_port(r.address)
            request.url = base.copy_with(host=host.strip("[]"), port=port)
            request.extensions["timeout"] = httpx.Timeout(attempt_timeout).as_dict()
            started = clock.monotonic()
            try:
                response = await client.send(request, **send_options)
            except Exception as exc:
                record(breaker, ticket, classify(exc, attempt_timeout == cap, 1.0), started)
                hung = isinstance(exc, httpx.TimeoutException) and attempt_timeout == cap
                if isinstance(exc, httpx.TransportError) and (
                    hung or not isinstance(exc, httpx.TimeoutException)
                ):
                    failed[0] = r
                    detector.failure(r, OUTCOME_LOCAL)
                    self.targets.refresh_soon()
                    if r.state is EJECTED:
                        with contextlib.suppress(AttributeError):
                            setattr(exc, EJECTED_REPLICA_ATTR, True)
                else:
                    detector.release(r)
                raise
            except BaseException:
                if breaker is not None:
                    breaker.release(ticket)
                detector.release(r)
                raise
            status = response.status_code
            if status in _REPLICA_ERRORS:
                failed[0] = r
                detector.failure(r, OUTCOME_ERROR)
            else:
                detector.success(r)
            if status in HTTP_RETRYABLE_STATUS:
                await response.aread()
                retryable = retryable_status(response)
                record(breaker, ticket, classify(retryable, attempt_timeout == cap, 1.0), started)
                raise retryable
            if breaker is not None:
                now = clock.monotonic()
                breaker.record(ticket, BREAKER_SUCCESS, now, now - started)
            return response

        return attempt

    async def close(self) -> None:
        """Stop checking and following the replica set."""
        if self.checker is not None:
            await self.checker.close()
        self.targets.release()
