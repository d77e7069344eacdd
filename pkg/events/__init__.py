"""Platform events: the envelope Foghorn publishes and Signalman consumes, and the sink interface.

Producers depend only on ``EventSink`` (non-blocking ``emit``). The sinks that carry events
away live in their own modules, chosen by ``pkg.events.factory.build_sink``: ``kafka`` (the
Kafka topic Signalman's consumer group reads) and ``signalman`` (Signalman's Publish RPC, the
embedded platform without Kafka). This package's top level stays free of any transport so that
domain code can import it.
"""

from pkg.events.sink import (
    SYSTEM_TENANT,
    Event,
    EventSink,
    ManagedSink,
    MemorySink,
    NullSink,
    SinkState,
)

__all__ = [
    "SYSTEM_TENANT",
    "Event",
    "EventSink",
    "ManagedSink",
    "MemorySink",
    "NullSink",
    "SinkState",
]
