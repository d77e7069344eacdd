"""``EventsBackend`` on Signalman, through the typed client ``pkg.clients.signalman``.

Signalman takes the tenant from the bearer token, never from the request, so Bridge holds one
Signalman credential per tenant (``BRIDGE_SIGNALMAN_TOKENS="acme=tok1,globex=tok2"``) and
subscribes with the caller's tenant's credential: isolation is enforced by Signalman itself.
A tenant without a credential gets SUBSCRIPTIONS_UNAVAILABLE. The client reconnects and resumes
on its own; a history gap is relayed as an event of type ``history_gap``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import grpc

from api_gateway import errors
from api_gateway.backend import BackendError, Json
from api_gateway.foghorn_backend import to_backend_error
from pkg.clients.signalman import Gap, SignalmanClient, SubscriptionError


def parse_tenant_tokens(spec: str) -> dict[str, str]:
    """``tenant=token,...`` -> {tenant: token}; raises ValueError naming a bad entry."""
    out: dict[str, str] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        tenant, sep, tok = entry.partition("=")
        if not (tenant.strip() and sep and tok.strip()):
            raise ValueError(f"bad signalman token entry {entry[:40]!r}: expected tenant=token")
        out[tenant.strip()] = tok.strip()
    return out


class SignalmanEvents:
    """Tenant event streams relayed from Signalman replicas."""

    def __init__(
        self,
        addresses: Sequence[str],
        tenant_tokens: dict[str, str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.credentials = credentials
        self.tenant_tokens = dict(tenant_tokens)
        self._clients: dict[str, SignalmanClient] = {}

    def _client(self, tenant: str) -> SignalmanClient:
        client = self._clients.get(tenant)
        if client is None:
            tok = self.tenant_tokens.get(tenant)
            if tok is None:
                raise BackendError(
                    errors.SUBSCRIPTIONS_UNAVAILABLE,
                    f"events of tenant {tenant!r} cannot be relayed: this gateway holds no "
                    "Signalman credential for it (BRIDGE_SIGNALMAN_TOKENS)",
                )
            client = SignalmanClient(self.addresses, token=tok, credentials=self.credentials)
            self._clients[tenant] = client
        return client

    async def subscribe(self, tenant: str, channels: list[str]) -> AsyncIterator[Json]:
        client = self._client(tenant)
        try:
            async with client.subscribe(channels) as sub:
                async for item in sub:
                    if isinstance(item, Gap):
                        yield {
                            "channel": item.channel,
                            "offset": str(item.resumed_from),
                            "epoch": item.epoch,
                            "id": "",
                            "type": "history_gap",
                            "tenant": tenant,
                            "time": 0.0,
                            "source": "signalman",
                            "data": json.dumps(
                                {"requested_after": item.requested_after, "reason": item.reason}
                            ),
                        }
                        continue
                    yield {
                        "channel": item.channel,
                        "offset": str(item.offset),
                        "epoch": item.epoch,
                        "id": item.id,
                        "type": item.type,
                        "tenant": item.tenant,
                        "time": item.time,
                        "source": item.source,
                        "data": item.data_json,
                    }
        except SubscriptionError as exc:
            raise BackendError(errors.BAD_USER_INPUT, exc.message[:300]) from None
        except grpc.RpcError as exc:
            raise to_backend_error(exc, "Signalman") from None

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
