"""Channels: which channel an event belongs to and which channels a principal may subscribe to."""

from __future__ import annotations

from pkg.events.sink import SYSTEM_TENANT

NODES = "nodes"
STREAMS = "streams"
ROUTING = "routing"
SYSTEM = "system"
ALL = "all"  # every channel of the subscriber's tenant

_BY_PREFIX = {"node": NODES, "stream": STREAMS, "routing": ROUTING}
TENANT_CHANNELS = frozenset({NODES, STREAMS, ROUTING, ALL})
KNOWN_CHANNELS = frozenset({*TENANT_CHANNELS, SYSTEM})


class UnknownEventType(ValueError):
    """An event type no channel carries."""


def classify(event_type: str, tenant: str) -> str:
    """The channel of an event: every SYSTEM event is on ``system``, others by type prefix."""
    if tenant == SYSTEM_TENANT:
        return SYSTEM
    prefix = event_type.split(".", 1)[0]
    channel = _BY_PREFIX.get(prefix)
    if channel is None:
        raise UnknownEventType(f"type {event_type!r}: no channel for prefix {prefix!r}")
    return channel


def matches(subscription: str, channel: str) -> bool:
    """Does a subscription to ``subscription`` receive an entry of ``channel``?"""
    return subscription == channel or (subscription == ALL and channel != SYSTEM)


# Platform events (the SYSTEM channel) are for platform credentials, never a tenant's.
SYSTEM_READERS = frozenset({"operator", "system"})


def check_subscribable(
    channel: str, roles: frozenset[str], tenant: str = ""
) -> tuple[str, str] | None:
    """``None`` if allowed, else ``(status code name, message)``. ``tenant`` is the
    subscriber's tenant ("" for a platform credential, which reads the SYSTEM channel only)."""
    if channel not in KNOWN_CHANNELS:
        known = ", ".join(sorted(KNOWN_CHANNELS))
        return "INVALID_ARGUMENT", f"unknown channel {channel[:64]!r}; known channels: {known}"
    if channel == SYSTEM:
        if roles & SYSTEM_READERS:
            return None
        return "PERMISSION_DENIED", "channel 'system' requires role operator or system"
    if not tenant:
        return (
            "PERMISSION_DENIED",
            f"channel {channel!r} is a tenant channel: requires a tenant credential "
            "(tenant-user or tenant-admin)",
        )
    return None


def history_tenant(channel: str, tenant: str) -> str:
    """Whose history a subscription reads: the SYSTEM channel reads the SYSTEM tenant's."""
    return SYSTEM_TENANT if channel == SYSTEM else tenant
