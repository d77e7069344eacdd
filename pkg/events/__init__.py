"""Platform events: the envelope Foghorn publishes and Signalman consumes, and the sink interface.

Producers depend only on ``EventSink`` (non-blocking ``emit``); the Kafka-backed sink lives in
``pkg.events.kafka`` and the in-memory one is the embedded default / test double.
"""

from pkg.events.sink import SYSTEM_TENANT, Event, EventSink, MemorySink, NullSink, build_sink

__all__ = ["SYSTEM_TENANT", "Event", "EventSink", "MemorySink", "NullSink", "build_sink"]
