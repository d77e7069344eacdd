"""The retry budget: a token bucket per target (gRFC A6 retryThrottling, Finagle's budget).

Failed attempts drain it, successes refill it slowly, and retries are allowed only while more
than half of it is left. During a total outage a caller therefore stops retrying after about
``max_tokens / 2`` failures and sends (close to) one attempt per call: an outage never
multiplies the load on the callee.
"""

from __future__ import annotations

from typing import Protocol

from pkg.clients.policy import BudgetPolicy


class SharedLink(Protocol):
    """The optional cross-process bucket behind a budget (``pkg.clients.shared_budget``)."""

    def success(self) -> None:
        """Count one success for the shared bucket."""

    def failure(self) -> None:
        """Count one failed attempt (or hedge) for the shared bucket."""


class RetryBudget:
    """Token bucket; float updates are cheap and races between threads only blur it slightly."""

    __slots__ = (
        "__weakref__",
        "enabled",
        "exhausted",
        "max_tokens",
        "ratio",
        "shared",
        "threshold",
        "tokens",
    )

    def __init__(self, policy: BudgetPolicy) -> None:
        self.enabled = policy.enabled
        self.max_tokens = policy.max_tokens
        self.ratio = policy.token_ratio
        self.threshold = policy.max_tokens / 2
        self.tokens = policy.max_tokens
        self.exhausted = 0  # how many retries/hedges it refused (a metric reads it)
        # Set when the bucket is shared by the replicas of the caller (through Redis): the
        # local tokens are then this process's view of the shared level.
        self.shared: SharedLink | None = None

    def on_success(self) -> None:
        """A successful call gives back ``token_ratio`` tokens (up to the cap)."""
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.max_tokens else self.max_tokens
        if self.shared is not None:
            self.shared.success()

    def on_failure(self) -> None:
        """A failed attempt (or a hedge sent) takes one token."""
        tokens = self.tokens - 1.0
        self.tokens = tokens if tokens > 0.0 else 0.0
        if self.shared is not None:
            self.shared.failure()

    def can_retry(self) -> bool:
        """Whether one more retry or hedge may be sent now; counts refusals."""
        if not self.enabled or self.tokens > self.threshold:
            return True
        self.exhausted += 1
        return False
