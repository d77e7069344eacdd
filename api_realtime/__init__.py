"""Signalman's process: gRPC Subscribe/GetStats/Publish, /health and /metrics, and the tail CLI.

The scale-out machinery (pipeline, ownership, history, fan-out) lives in ``signalman/``.
"""
