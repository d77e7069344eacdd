"""Invalid settings fail at construction with a ValueError that names the field; the channel
options every channel gets."""

from __future__ import annotations

import pytest

from pkg.clients import (
    Backoff,
    BreakerPolicy,
    BudgetPolicy,
    HedgePolicy,
    Policy,
    RetryPolicy,
    aio_channel,
    sync_channel,
)
from pkg.clients.deadline import deadline_scope
from pkg.clients.grpc_core import channel_options
from pkg.clients.http import AsyncHttpClient, HttpClient
from pkg.clients.policy import NAME_PREFIX_VERBS
from pkg.clients.shared_breaker import SharedBreakerStore
from pkg.clients.targets import resolve_targets


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: RetryPolicy(max_attempts=-1), "retry.max_attempts"),
        (lambda: RetryPolicy(max_attempts=0), "retry.max_attempts"),
        (lambda: RetryPolicy(base_backoff=-0.1), "retry.base_backoff"),
        (lambda: RetryPolicy(base_backoff=1.0, max_backoff=0.5), "retry.max_backoff"),
        (lambda: RetryPolicy(multiplier=0.5), "retry.multiplier"),
        (lambda: RetryPolicy(attempt_timeout=0), "retry.attempt_timeout"),
        (lambda: RetryPolicy(base_backoff=float("nan")), "retry.base_backoff"),
        (lambda: RetryPolicy(idempotent_methods=["x"]), "retry.idempotent_methods"),  # type: ignore[arg-type]
        (lambda: BudgetPolicy(token_ratio=1.5), "budget.token_ratio"),
        (lambda: BudgetPolicy(token_ratio=0), "budget.token_ratio"),
        (lambda: BudgetPolicy(max_tokens=0), "budget.max_tokens"),
        (lambda: BreakerPolicy(failure_ratio=1.2), "breaker.failure_ratio"),
        (lambda: BreakerPolicy(failure_ratio=-0.1), "breaker.failure_ratio"),
        (lambda: BreakerPolicy(min_calls=0), "breaker.min_calls"),
        (lambda: BreakerPolicy(window=0), "breaker.window"),
        (lambda: BreakerPolicy(open_duration=-1), "breaker.open_duration"),
        (lambda: BreakerPolicy(buckets=0), "breaker.buckets"),
        (lambda: HedgePolicy(max_attempts=1), "hedge.max_attempts"),
        (lambda: HedgePolicy(delay=-1), "hedge.delay"),
        (lambda: Policy(timeout=0), "policy.timeout"),
        (lambda: Policy(timeout=float("inf")), "policy.timeout"),
        (lambda: Policy(retry=BudgetPolicy()), "policy.retry"),  # type: ignore[arg-type]
        (lambda: Backoff(base=1.0, cap=0.5), "cap"),
        (lambda: Backoff(base="0.1"), "base"),  # type: ignore[arg-type]
        (lambda: deadline_scope(float("nan")).__enter__(), "deadline seconds"),
        (lambda: deadline_scope("1").__enter__(), "deadline seconds"),  # type: ignore[arg-type]
        (lambda: Policy(timeout=True), "policy.timeout"),  # a bool is no duration
        (lambda: RetryPolicy(max_attempts=True), "retry.max_attempts"),
        (lambda: RetryPolicy(attempt_timeout=-1), "retry.attempt_timeout"),
        (lambda: RetryPolicy(attempt_timeouts=(("/x.v1.X/*", 0),)), "retry.attempt_timeouts"),
        (lambda: BreakerPolicy(probe_timeout=float("nan")), "breaker.probe_timeout"),
        (lambda: Policy(stream_setup=0), "policy.stream_setup"),
    ],
)
def test_invalid_setting_raises_value_error_naming_the_field(build, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


@pytest.mark.parametrize(
    "targets",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:notaport",
        "127.0.0.1:70000",
        "http://127.0.0.1:5000",
        ["127.0.0.1:1", "svc.example:2"],
        ["127.0.0.1:1", "[::1]:2"],
        ["127.0.0.1:1", "127.0.0.1:1"],
        [],
    ],
)
def test_unknown_target_syntax_is_rejected_at_construction(targets) -> None:
    with pytest.raises(ValueError, match="target"):
        aio_channel(targets)
    with pytest.raises(ValueError, match="target"):
        sync_channel(targets)


def test_several_replicas_become_one_round_robin_target() -> None:
    resolved = resolve_targets(["127.0.0.1:5001", "localhost:5002"])
    assert resolved.multi
    assert resolved.target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert resolve_targets("127.0.0.1:1,127.0.0.1:2").multi
    assert resolve_targets("dns:///svc.internal:443").target == "dns:///svc.internal:443"
    assert resolve_targets(["[::1]:1", "[::1]:2"]).target == "ipv6:[::1]:1,[::1]:2"


def test_grpc_retries_cannot_be_turned_back_on() -> None:
    with pytest.raises(ValueError, match="enable_retries"):
        aio_channel("127.0.0.1:1", options=[("grpc.enable_retries", 1)])


CLIENTS = {
    "aio_channel": lambda **kw: aio_channel("127.0.0.1:1", **kw),
    "sync_channel": lambda **kw: sync_channel("127.0.0.1:1", **kw),
    "HttpClient": lambda **kw: HttpClient("http://127.0.0.1:1", **kw),
    "AsyncHttpClient": lambda **kw: AsyncHttpClient("http://127.0.0.1:1", **kw),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("token", ""),
        ("token", "s3cret\n"),  # read from a file with its newline
        ("token", " s3cret"),
        ("token", "s3cr\u00e9t"),  # not ASCII: no valid header value
        ("token", 42),
        ("policy", object()),
        ("policy", RetryPolicy()),
        ("policy", 0),  # falsy: must not silently become the default policy
        ("runtime", "runtime"),
        ("runtime", Policy()),
    ],
)
def test_every_client_rejects_a_bad_token_policy_or_runtime_at_construction(
    client, argument, value
) -> None:
    with pytest.raises(ValueError, match=argument):
        CLIENTS[client](**{argument: value})


def test_a_rejected_token_is_not_echoed_in_the_error() -> None:
    with pytest.raises(ValueError) as info:
        aio_channel("127.0.0.1:1", token="top-secret\n")
    assert "top-secret" not in str(info.value)


def test_shared_breaker_store_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="url"):
        SharedBreakerStore()
    for interval in (0, "0.2"):
        with pytest.raises(ValueError, match="sync_interval"):
            SharedBreakerStore("redis://127.0.0.1:1/0", sync_interval=interval)  # type: ignore[arg-type]


def test_idempotency_comes_from_the_contract_then_explicit_lists_never_the_name() -> None:
    policy = RetryPolicy(
        idempotent_methods=("/billing.v1.Billing/Charge",),
        non_idempotent_methods=("/foghorn.v1.NodeAdmin/GetNode",),
    )
    # idempotency_level in the .proto (loaded with the generated stubs)
    assert policy.is_idempotent("/foghorn.v1.NodeAdmin/ListNodes")  # NO_SIDE_EFFECTS
    assert policy.is_idempotent("/foghorn.v1.Routing/RouteViewer")  # IDEMPOTENT
    assert policy.is_idempotent("/testsvc.v1.TestService/Unary")  # IDEMPOTENT
    assert not policy.is_idempotent("/foghorn.v1.NodeAdmin/SetMode")  # declares nothing
    assert not policy.is_idempotent("/testsvc.v1.TestService/Charge")
    assert policy.is_idempotent("/grpc.health.v1.Health/Check")  # gRPC's standard reads
    # Names prove nothing: unknown methods are not idempotent, whatever their verb.
    for name in ("GetOrCreateCart", "ListenAndCharge", "Checkout", "GetNode"):
        assert not policy.is_idempotent(f"/shop.v1.Cart/{name}")
    # Explicit patterns win over the contract.
    assert policy.is_idempotent("/billing.v1.Billing/Charge")
    assert not policy.is_idempotent("/foghorn.v1.NodeAdmin/GetNode")


def test_name_prefix_guessing_is_an_explicit_opt_in() -> None:
    guessing = RetryPolicy(idempotent_verbs=NAME_PREFIX_VERBS)
    assert guessing.is_idempotent("/shop.v1.Cart/GetCart")
    assert not guessing.is_idempotent("/shop.v1.Cart/CreateCart")
    # Why it is no longer the default: "Checkout" starts with "Check".
    assert guessing.is_idempotent("/shop.v1.Cart/Checkout")
    for name in ("GetCart", "Checkout"):
        assert not RetryPolicy().is_idempotent(f"/shop.v1.Cart/{name}")


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: RetryPolicy(idempotent_methods=("testsvc.v1.TestService/*",)), "testsvc.v1"),
        (lambda: RetryPolicy(non_idempotent_methods=("Charge",)), "'Charge'"),
        (
            lambda: RetryPolicy(idempotent_methods=("/testsvc.v1.TestService.Unary",)),
            "TestService.Unary",
        ),
        (lambda: RetryPolicy(attempt_timeouts=(("foghorn.v1.Routing/*", 0.3),)), "Routing"),
        (lambda: HedgePolicy(methods=("*/Get*",)), "Get"),
        (lambda: RetryPolicy(idempotent_methods=("/a.B/ C",)), "/a.B/ C"),
    ],
)
def test_bad_method_patterns_are_refused_naming_the_pattern(build, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="bad method pattern") as info:
        build()
    assert pattern in str(info.value)


def test_good_method_patterns_are_accepted() -> None:
    RetryPolicy(
        idempotent_methods=("/testsvc.v1.TestService/*", "/*", "/billing.v1.*/Get[A-Z]*"),
        non_idempotent_methods=("/foghorn.v1.NodeAdmin/SetMode",),
    )


def test_channels_disable_grpc_retries_set_keepalive_and_round_robin() -> None:
    single = dict(channel_options(resolve_targets("127.0.0.1:1")))
    assert single["grpc.enable_retries"] == 0
    assert single["grpc.keepalive_time_ms"] == 330_000
    assert "grpc.lb_policy_name" not in single
    multi = dict(channel_options(resolve_targets(["127.0.0.1:1", "127.0.0.1:2"])))
    assert multi["grpc.lb_policy_name"] == "round_robin"
    assert multi["grpc.enable_retries"] == 0
