"""The one config loader: sections, frozen settings, unknown variables refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from pkg.common.config import ConfigError, load, load_settings, setting_names, unknown_settings


@dataclass(frozen=True)
class Inner:
    lease_ttl_s: float = 15.0

    def __post_init__(self) -> None:
        if self.lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")


@dataclass(frozen=True)
class Outer:
    port: int = 1
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_a_section_reads_its_fields_with_the_same_prefix() -> None:
    cfg = load(Outer, "SVC", env={"SVC_PORT": "7", "SVC_LEASE_TTL_S": "2.5", "SVC_NAMES": "a, b"})
    assert cfg.port == 7 and cfg.inner.lease_ttl_s == 2.5 and cfg.names == ["a", "b"]
    assert setting_names(Outer, "SVC") == {"SVC_PORT", "SVC_NAMES", "SVC_LEASE_TTL_S"}


def test_settings_are_frozen() -> None:
    cfg = load(Outer, "SVC", env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 2  # type: ignore[misc]


def test_a_bad_value_in_a_section_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        load(Outer, "SVC", env={"SVC_LEASE_TTL_S": "0"})


def test_unknown_variables_of_the_prefix_and_platform_are_refused_with_the_closest_name() -> None:
    env = {"SVC_PROT": "7", "PLATFORM_TOKEN": "x", "OTHER_THING": "1", "SVC_PORT": "1"}
    with pytest.raises(ConfigError) as err:
        load_settings(Outer, "SVC", env, docs="docs/svc.md")
    message = str(err.value)
    assert "SVC_PROT is not a setting (did you mean SVC_PORT?)" in message
    assert "PLATFORM_TOKEN is not a setting (did you mean PLATFORM_TOKENS?)" in message
    assert "OTHER_THING" not in message and "docs/svc.md" in message


def test_a_name_far_from_every_setting_gets_no_suggestion() -> None:
    found = unknown_settings({"SVC_ZZZZZZZZZZZZ": "1"}, ["SVC"], ["SVC_PORT"])
    assert found == [("SVC_ZZZZZZZZZZZZ", None)]


def test_names_read_by_the_services_tools_are_accepted() -> None:
    cfg = load_settings(Outer, "SVC", {"SVC_ADDR": "h:1"}, also_known={"SVC_ADDR"})
    assert cfg.port == 1
