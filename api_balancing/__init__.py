"""Foghorn: load balancer and control service for a fleet of media edge nodes."""
