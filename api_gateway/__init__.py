"""Bridge: the platform's public GraphQL gateway (HTTP + WebSocket subscriptions).

Layout: ``__main__`` (process), ``server`` (wiring from config), ``http`` (ASGI app: auth, rate
limits, GraphiQL, /health, /metrics), ``websocket`` (graphql-transport-ws under the same rules),
``fanout`` (a tenant's subscriptions sharing one Signalman stream), ``schema`` (GraphQL types
and resolvers), ``service`` (queries -> cache -> backends), ``backend`` (what Bridge needs from
Foghorn and Signalman), ``foghorn_backend`` / ``signalman_backend`` (those needs met through
``pkg.clients``), ``auth`` (JWT), ``errors`` (stable error codes and their format). Shared
state lives in the top-level ``bridge`` package.
"""
