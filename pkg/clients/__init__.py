"""pkg.clients: the resilient client library every gRPC and HTTP call of the platform uses.

    from pkg.clients import aio_channel, Policy

    channel = aio_channel(["127.0.0.1:5001", "127.0.0.1:5002"], Policy(timeout=2.0), token=tok)
    stub = MyServiceStub(channel)
    reply = await stub.GetThing(request, timeout=1.0)

One overall deadline per call, retries only when safe (deadline first, with backoff and
pushback), a retry budget and a circuit breaker per target, hedging on request, replica
failover with outlier ejection, OpenTelemetry metrics and structlog events. See docs/clients.md.
"""

from pkg.clients.backoff import Backoff, delays
from pkg.clients.breaker import BreakerOpenError, CircuitBreaker
from pkg.clients.deadline import deadline_from_grpc, deadline_scope
from pkg.clients.grpc_aio import ResilientChannel, aio_channel
from pkg.clients.grpc_sync import sync_channel
from pkg.clients.http import AsyncHttpClient, HttpClient
from pkg.clients.outlier import OutlierDetector, OutlierEvent
from pkg.clients.policy import (
    BreakerPolicy,
    BudgetPolicy,
    HedgePolicy,
    KeepalivePolicy,
    LimiterPolicy,
    OutlierPolicy,
    Policy,
    RetryPolicy,
)
from pkg.clients.runtime import Runtime
from pkg.clients.shared_breaker import SharedBreakerStore
from pkg.clients.shared_budget import SharedBudgetStore
from pkg.clients.telemetry import (
    Instrumentation,
    OtelInstrumentation,
    RetryEvent,
    StructlogInstrumentation,
)
from pkg.clients.testing import set_testing, testing

__all__ = [
    "AsyncHttpClient",
    "Backoff",
    "BreakerOpenError",
    "BreakerPolicy",
    "BudgetPolicy",
    "CircuitBreaker",
    "HedgePolicy",
    "HttpClient",
    "Instrumentation",
    "KeepalivePolicy",
    "LimiterPolicy",
    "OtelInstrumentation",
    "OutlierDetector",
    "OutlierEvent",
    "OutlierPolicy",
    "Policy",
    "ResilientChannel",
    "RetryEvent",
    "RetryPolicy",
    "Runtime",
    "SharedBreakerStore",
    "SharedBudgetStore",
    "StructlogInstrumentation",
    "aio_channel",
    "deadline_from_grpc",
    "deadline_scope",
    "delays",
    "set_testing",
    "sync_channel",
    "testing",
]
