"""The client's address behind trusted proxies (pkg.common.forwarded): only hops appended by
trusted proxies are believed, read right to left."""

from __future__ import annotations

import pytest

from pkg.common.forwarded import NO_PROXIES, TrustedProxies

LB = TrustedProxies.parse("10.0.0.0/8, 2001:db8:1::/48, 192.168.1.5")


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert NO_PROXIES.client_address("10.1.1.1", ["203.0.113.7"]) == "10.1.1.1"
    assert not NO_PROXIES and LB


def test_a_header_from_an_untrusted_peer_is_ignored() -> None:
    assert LB.client_address("198.51.100.4", ["203.0.113.7"]) == "198.51.100.4"


def test_the_rightmost_hop_that_is_not_a_trusted_proxy_is_the_client() -> None:
    # client 203.0.113.7 -> edge proxy 10.0.0.2 -> balancer 10.0.0.1 -> us
    assert LB.client_address("10.0.0.1", ["203.0.113.7, 10.0.0.2"]) == "203.0.113.7"
    # Headers repeated by hops count in order, as one list.
    assert LB.client_address("10.0.0.1", ["203.0.113.7", "10.0.0.2"]) == "203.0.113.7"


def test_a_client_cannot_choose_its_address_by_writing_the_header_itself() -> None:
    # The client sent "X-Forwarded-For: 1.2.3.4"; the balancer appended its real address.
    assert LB.client_address("10.0.0.1", ["1.2.3.4, 203.0.113.7"]) == "203.0.113.7"


def test_all_hops_trusted_gives_the_leftmost_and_a_garbled_hop_stops_at_the_last_proxy() -> None:
    assert LB.client_address("10.0.0.1", ["10.0.0.3, 10.0.0.2"]) == "10.0.0.3"
    assert LB.client_address("10.0.0.1", ["203.0.113.7, unknown, 10.0.0.2"]) == "10.0.0.2"
    assert LB.client_address("10.0.0.1", []) == "10.0.0.1"


def test_ipv6_ports_and_ipv4_mapped_peers() -> None:
    assert LB.client_address("2001:db8:1::9", ["[2001:db8:ff::1]:4431"]) == "2001:db8:ff::1"
    assert LB.client_address("::ffff:192.168.1.5", ["203.0.113.7"]) == "203.0.113.7"
    assert LB.trusts("192.168.1.5") and not LB.trusts("192.168.1.6")
    assert not LB.trusts("not-an-ip")


@pytest.mark.parametrize("spec", ["10.0.0.0/33", "example.com", "10.0.0.1,,nope"])
def test_a_bad_entry_is_refused_naming_it(spec: str) -> None:
    with pytest.raises(ValueError, match="is not an address or CIDR"):
        TrustedProxies.parse(spec)
