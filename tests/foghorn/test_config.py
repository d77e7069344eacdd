"""Configuration: FOGHORN_* variables, checked at start-up with the variable named."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from api_balancing.config import FoghornConfig, load_config
from pkg.common.config import ConfigError, load


def test_weights_and_timings_come_from_the_environment() -> None:
    config = load(
        FoghornConfig,
        "FOGHORN",
        env={"FOGHORN_WEIGHT_GEO": "2000", "FOGHORN_STALE_AFTER_S": "30", "FOGHORN_GRPC_PORT": "9"},
    )
    assert config.weights.geo == 2000 and config.weights.cpu == 500
    assert config.stale_after_s == 30 and config.grpc_port == 9
    assert config.replica_id  # defaulted to host-pid


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FOGHORN_GRPC_PORT": "abc"}, "FOGHORN_GRPC_PORT"),
        ({"FOGHORN_WEIGHT_CPU": "-1"}, "weight_cpu"),
        ({"FOGHORN_STALE_AFTER_S": "0"}, "stale_after_s"),
        ({"FOGHORN_ROUTING_EVENT_SAMPLE": "2"}, "routing_event_sample"),
        ({"FOGHORN_WEIGHT_GEO": "nan"}, "weight_geo"),
    ],
)
def test_bad_values_fail_naming_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(FoghornConfig, "FOGHORN", env=env)
    assert needle in str(err.value)


def test_foghorn_refuses_to_start_on_bad_configuration() -> None:
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(
        [f"{bin_dir}/foghorn"],
        env={**os.environ, "FOGHORN_EVICT_AFTER_S": "soon"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "FOGHORN_EVICT_AFTER_S" in result.stderr


def test_accepted_tokens_come_from_foghorn_tokens_else_platform_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLATFORM_TOKENS", "platform-tok=ops:operator")
    assert list(FoghornConfig().platform_tokens()) == ["platform-tok"]
    own = FoghornConfig(tokens="own-tok=svc@acme:tenant-user,second=x:operator")
    assert list(own.platform_tokens()) == ["own-tok", "second"]
    assert own.platform_tokens()["own-tok"].tenant == "acme"


def test_replicas_relay_with_a_replica_credential_never_the_first_accepted_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from api_balancing.config import HaConfig
    from api_balancing.ha.runtime import relay_token
    from pkg.common.config import ConfigError

    monkeypatch.setenv("PLATFORM_TOKENS", "ops-tok=ops:operator,relay-tok=relay:replica")
    assert relay_token(FoghornConfig(ha=HaConfig())) == "relay-tok"
    assert relay_token(FoghornConfig(ha=HaConfig(relay_token="relay-tok"))) == "relay-tok"
    with pytest.raises(ConfigError, match="FOGHORN_RELAY_TOKEN"):
        relay_token(FoghornConfig(ha=HaConfig(relay_token="ops-tok")))  # not a replica
    with pytest.raises(ConfigError, match="FOGHORN_RELAY_TOKEN"):
        relay_token(FoghornConfig(tokens="own=a:operator", ha=HaConfig()))  # none has the role


@pytest.mark.parametrize("value", [-1.0, 101.0, float("nan")])
def test_a_write_linger_out_of_range_is_refused_naming_the_setting(value: float) -> None:
    from api_balancing.config import HaConfig

    with pytest.raises(ValueError, match="write_linger_ms"):
        HaConfig(write_linger_ms=value)


def test_the_write_linger_reaches_the_store_in_seconds() -> None:
    from api_balancing.config import HaConfig
    from api_balancing.ha.runtime import build_store

    store = build_store(
        FoghornConfig(redis_url="redis://127.0.0.1:1/0", ha=HaConfig(write_linger_ms=0))
    )
    assert store.settings.linger_s == 0.0
    assert HaConfig().write_linger_ms == 5.0


def test_an_unknown_foghorn_variable_is_refused_with_the_closest_setting() -> None:
    from api_balancing.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(env={"FOGHORN_CLUSTR": "x", "FOGHORN_GRPC_PORT": "9"})
    assert "FOGHORN_CLUSTR is not a setting (did you mean FOGHORN_CLUSTER?)" in str(err.value)


def test_the_tools_variables_are_known_so_one_shell_can_run_both() -> None:
    from api_balancing.config import load_config

    config = load_config(env={"FOGHORN_ADDR": "127.0.0.1:1", "FOGHORN_TOKEN": "t"})
    assert config.grpc_port == 18008


def test_foghorn_refuses_to_start_on_a_misspelled_setting() -> None:
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(
        [f"{bin_dir}/foghorn"],
        env={**os.environ, "FOGHORN_CLUSTR": "x"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "FOGHORN_CLUSTR" in result.stderr and "FOGHORN_CLUSTER" in result.stderr


def test_the_relay_address_is_the_advertised_host_not_a_wildcard_listen_address() -> None:
    from api_balancing.server import FoghornApp

    env = {
        "FOGHORN_HOST": "0.0.0.0",
        "FOGHORN_REDIS_URL": "redis://10.0.0.5:6379/0",
        "FOGHORN_TOKENS": "relay-secret=relay:replica",  # HA needs its relay credential
    }
    with pytest.raises(ConfigError, match="FOGHORN_ADVERTISE_HOST"):
        load(FoghornConfig, "FOGHORN", env=env)
    config = load(FoghornConfig, "FOGHORN", env={**env, "FOGHORN_ADVERTISE_HOST": "10.1.2.3"})
    app = FoghornApp(config)
    assert app.grpc_target == "10.1.2.3:0"  # the port is known once the server listens
    assert FoghornApp(load(FoghornConfig, "FOGHORN", env={})).grpc_target == "127.0.0.1:0"


def test_an_unknown_event_loop_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="event_loop must be one of asyncio, uvloop"):
        load_config({"FOGHORN_EVENT_LOOP": "trio"})
    assert load_config({"FOGHORN_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"
