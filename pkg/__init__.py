"""Shared code of the platform: the resilient client library, common service plumbing, dev stack."""
