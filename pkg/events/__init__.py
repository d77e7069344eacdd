"""Platform events: the envelope Foghorn publishes and Signalman consumes, and the sink interface.

Producers depend only on ``EventSink`` (non-blocking ``emit``); the Kafka-backed sink lives in
``pkg.events.kafka`` and the in-memory one is the embedded default / test double.
"""

from pkg.events.sink import Event, EventSink, MemorySink, NullSink

__all__ = ["Event", "EventSink", "MemorySink", "NullSink"]
