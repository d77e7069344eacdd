"""Plumbing shared by the services: clock, config loader, logging, telemetry, gRPC server, auth.

One way to do each thing: every service uses these and nothing else for the same job.
"""
