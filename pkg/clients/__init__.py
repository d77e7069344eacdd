"""The shared resilient client library (being built: see docs/clients.md when it lands)."""
