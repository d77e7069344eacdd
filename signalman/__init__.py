"""Signalman's scale-out machinery: the event pipeline, partition ownership fenced by PostgreSQL
advisory locks, per-tenant ordered history (memory or Redis Streams) and fan-out to subscribers.

The wire API and the process live in ``api_realtime``; see docs/rfcs/signalman-scaling.md.
"""
