"""Bridge's shared state: response cache, rate limiter and tenant limits.

Every piece sits behind a small store interface (``bridge.store``) with an in-memory
implementation (embedded default, and the fallback while Redis is down) and a Redis
implementation (HA: all Bridge replicas share it). Domain modules here never import redis.
"""
