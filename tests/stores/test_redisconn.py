"""The Redis connection spec: plain URLs pass through, Sentinel specs are parsed, bad ones are
refused with a message saying what is wrong."""

from __future__ import annotations

import pytest

from pkg.common.redisconn import SpecError, parse_spec


def test_a_plain_url_is_used_as_given() -> None:
    spec = parse_spec("redis://:pw@127.0.0.1:6379/2")
    assert not spec.is_sentinel
    assert spec.url == "redis://:pw@127.0.0.1:6379/2"
    assert spec.describe() == "redis://127.0.0.1:6379/2"  # no credentials in logs


def test_a_sentinel_spec_names_sentinels_master_password_and_options() -> None:
    spec = parse_spec(
        "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/3"
        "?sentinel_password=spw&ssl=true&ssl_cert_reqs=none"
    )
    assert spec.is_sentinel
    assert spec.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert spec.service == "mymaster"
    assert spec.db == 3
    assert spec.password == "s3cret" and spec.username is None
    assert spec.sentinel_password == "spw"
    assert spec.ssl and dict(spec.ssl_options) == {"ssl_cert_reqs": "none"}
    assert "s3cret" not in spec.describe()


def test_rediss_sentinel_means_tls_and_user_password_pairs_are_kept() -> None:
    spec = parse_spec("rediss+sentinel://app:pw@h:1/m?db=1")
    assert spec.ssl and spec.username == "app" and spec.password == "pw" and spec.db == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("http://h:1", "scheme"),
        ("redis+sentinel://h:1", "master name"),
        ("redis+sentinel://h/m", "host:port"),
        ("redis+sentinel://h:99999/m", "host:port"),
        ("redis+sentinel://h:1/m?sentinel_pasword=x", "unknown"),
        ("redis+sentinel://h:1/m/x", "not a number"),
    ],
)
def test_a_bad_spec_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(text)
