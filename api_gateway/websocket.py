"""GraphQL over WebSocket (``graphql-transport-ws``) with the same rules as GraphQL over HTTP.

Strawberry's protocol handler, with Bridge's guard in every place HTTP has it:

- Credentials: a bearer token in the upgrade's ``Authorization`` header or in
  ``connection_init``'s payload (``{"Authorization": "Bearer ..."}``, for browsers). A refused
  token closes the socket with a reason a client can act on: 4401 ``token expired`` (refresh and
  reconnect) or 4403 ``invalid token: <why>`` (give up). The socket is closed with 4401
  ``token expired`` when its token expires, unless the client re-authenticates first by sending a
  ``ping`` whose payload carries a fresh ``Authorization`` for the same tenant.
- Rate limits: opening the socket is charged like one HTTP request (to the bucket of the
  upgrade's token, or of the client address when it has none) and so is every ``subscribe``
  (query, mutation or subscription), to the bucket of the socket's current credentials (the
  token of ``connection_init`` once given). A refused connection closes
  with 4429 ``rate limited: retry after N s``; a refused operation gets an ``error`` message
  with ``extensions.code`` RATE_LIMITED and ``extensions.retryAfter``.
- Automatic persisted queries (``api_gateway.persisted``), as on HTTP and with the same
  registry: a ``subscribe`` whose payload has ``extensions.persistedQuery`` and no query runs the
  registered query, or gets an ``error`` message PERSISTED_QUERY_NOT_FOUND (the client then sends
  the query with its hash, which registers it); a malformed extension or a hash that is not the
  query's is an ``error`` message BAD_REQUEST. The socket stays open in every case.
- Sizes: frames are capped by the server (``ws_max_size`` = the HTTP body limit, close 1009) and
  a query larger than the HTTP query limit is refused (PAYLOAD_TOO_LARGE).
- Errors: parse, validation and limit errors, and the access map's refusals (a root field the
  socket's token may not use: UNAUTHENTICATED / FORBIDDEN, nothing runs; ``api_gateway.access``)
  are ``error`` messages for the operation's id with ``extensions.code``, never a socket closed
  on a syntax error or a traceback that quotes the query in the log.

The legacy ``graphql-ws`` subprotocol (subscriptions-transport-ws) is not offered: an upgrade
that does not offer ``graphql-transport-ws`` is refused with HTTP 400 and a body saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from graphql import GraphQLError
from strawberry.http import GraphQLRequestData
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    PingMessage,
    SubscribeMessage,
)
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.utils.aio import aclosing

from api_gateway import errors
from api_gateway.auth import AuthError
from api_gateway.errors import format_error
from api_gateway.persisted import (
    NOT_FOUND_CODE,
    NOT_FOUND_MESSAGE,
    PersistedQueryInvalid,
    PersistedQueryNotFound,
)
from bridge.token_bucket import Decision

log = structlog.get_logger("bridge.ws")

PROTOCOL = "graphql-transport-ws"
CLOSE_TOKEN_EXPIRED = 4401
CLOSE_INVALID_TOKEN = 4403
CLOSE_RATE_LIMITED = 4429
_MAX_REASON = 120  # a close reason is at most 123 bytes


def retry_after_s(d: Decision) -> int:
    """Whole seconds until a refused request may succeed (at least 1)."""
    return max(1, d.retry_after_s)


def refusal(exc: AuthError) -> tuple[int, str]:
    """The close code and reason for a refused token."""
    if exc.expired:
        return CLOSE_TOKEN_EXPIRED, "token expired"
    return CLOSE_INVALID_TOKEN, _reason(f"invalid token: {exc}")


def _reason(text: str) -> str:
    return text.encode()[:_MAX_REASON].decode(errors="ignore")


def _auth_header(payload: Any) -> tuple[bool, Any]:
    if not isinstance(payload, dict):
        return False, None
    for key in ("Authorization", "authorization"):
        if key in payload:
            return True, payload[key]
    return False, None


class BridgeOperation(Operation[dict[str, Any], None]):
    """An operation whose results and errors are formatted as on HTTP (``extensions.code``)."""

    __slots__ = ()

    async def send_initial_errors(self, errors_: list[GraphQLError]) -> None:
        message: Any = {
            "id": self.id,
            "type": "error",
            "payload": [format_error(e) for e in errors_],
        }
        await self.send_operation_message(message)

    async def send_next(self, execution_result: ExecutionResult) -> None:
        payload: dict[str, Any] = {"data": execution_result.data}
        if execution_result.errors:
            payload["errors"] = [format_error(e) for e in execution_result.errors]
        if execution_result.extensions:
            payload["extensions"] = execution_result.extensions
        message: Any = {"id": self.id, "type": "next", "payload": payload}
        await self.send_operation_message(message)


class BridgeTransportWSHandler(BaseGraphQLTransportWSHandler[dict[str, Any], None]):
    """``graphql-transport-ws`` under Bridge's auth, rate limits, sizes and error format."""

    # api_gateway.http.BridgeGraphQL, which owns the guard and the limits (not imported: the
    # view imports this handler).
    view: Any

    async def handle(self) -> None:
        self._expiry: asyncio.Task[None] | None = None
        try:
            await super().handle()
        finally:
            if self._expiry is not None:
                self._expiry.cancel()

    # -- credentials ------------------------------------------------------------------------
    def _watch_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires_at = self.context.get("expires_at")
        if expires_at is not None:
            self._expiry = asyncio.create_task(self._close_at(expires_at))

    async def _close_at(self, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        log.info("ws_token_expired", tenant=self.context["principal"].tenant)
        await self.websocket.close(CLOSE_TOKEN_EXPIRED, "token expired")

    async def _authenticate(self, raw: Any) -> bool:
        """Take the token in ``raw`` as this socket's credentials; False once it is closed."""
        if not isinstance(raw, str):
            await self.websocket.close(
                CLOSE_INVALID_TOKEN, "invalid token: Authorization must be a string"
            )
            return False
        try:
            principal, expires_at = self.view.guard.auth.authenticate_until(raw)
        except AuthError as exc:
            await self.websocket.close(*refusal(exc))
            return False
        current = self.context["principal"]
        if self.connection_acknowledged and principal.tenant != current.tenant:
            await self.websocket.close(
                CLOSE_INVALID_TOKEN, "invalid token: it is for another tenant"
            )
            return False
        self.context["principal"] = principal
        self.context["expires_at"] = expires_at
        return True

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        if self.connection_timed_out:
            return
        if self.connection_init_timeout_task:
            self.connection_init_timeout_task.cancel()
        payload = message.get("payload") or {}
        if not isinstance(payload, dict):
            await self.websocket.close(4400, "Invalid connection init payload")
            return
        if self.connection_init_received:
            await self.websocket.close(4429, "Too many initialisation requests")
            return
        self.connection_init_received = True
        self.context["connection_params"] = payload
        present, raw = _auth_header(payload)
        if present and not await self._authenticate(raw):
            return
        await self.send_message({"type": "connection_ack"})
        self.connection_acknowledged = True
        self._watch_expiry()

    async def handle_ping(self, message: PingMessage) -> None:
        present, raw = _auth_header(message.get("payload"))
        if present and self.connection_acknowledged:
            if not await self._authenticate(raw):
                return
            self._watch_expiry()
        await self.send_message({"type": "pong"})

    # -- operations -------------------------------------------------------------------------
    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        if not self.connection_acknowledged:
            await self.websocket.close(4401, "Unauthorized")
            return
        op_id, payload = message.get("id"), message.get("payload")
        query = payload.get("query") if isinstance(payload, dict) else None
        extensions = payload.get("extensions") if isinstance(payload, dict) else None
        persisted = isinstance(extensions, dict) and "persistedQuery" in extensions
        if (
            not isinstance(op_id, str)
            or not op_id
            or not (isinstance(query, str) or (query is None and persisted))
        ):
            await self.websocket.close(
                4400,
                "Invalid subscribe message: needs id and payload.query "
                "(or payload.extensions.persistedQuery)",
            )
            return
        assert isinstance(payload, dict)
        if op_id in self.operations:
            await self.websocket.close(4409, _reason(f"Subscriber for {op_id} already exists"))
            return
        variables, name = payload.get("variables"), payload.get("operationName")
        if not isinstance(variables, dict | None) or not isinstance(name, str | None):
            await self._refuse(
                op_id, errors.BAD_REQUEST, "variables must be an object and operationName a string"
            )
            return
        limit = self.view.limits.max_query_bytes
        if query is not None and len(query.encode()) > limit:
            await self._refuse(op_id, errors.PAYLOAD_TOO_LARGE, f"query larger than {limit} bytes")
            return
        guard = self.view.guard
        decision = await guard.admit(self.context["principal"], self.context["client_ip"])
        if not decision.allowed:
            wait = retry_after_s(decision)
            await self._refuse(
                op_id,
                errors.RATE_LIMITED,
                f"rate limit exceeded: retry after {wait} s",
                retryAfter=wait,
            )
            return
        if persisted:
            # After the charge, as on HTTP: a miss costs the request it is.
            request = GraphQLRequestData(
                query=query, variables=variables, operation_name=name, extensions=extensions
            )
            try:
                query = self.view.persisted.resolve(request).query
            except PersistedQueryNotFound:
                await self._refuse(op_id, NOT_FOUND_CODE, NOT_FOUND_MESSAGE)
                return
            except PersistedQueryInvalid as exc:
                await self._refuse(op_id, errors.BAD_REQUEST, str(exc))
                return
        assert isinstance(query, str)
        operation = BridgeOperation(self, op_id, query, variables, name)
        operation.task = asyncio.create_task(self.run_operation(operation))
        operation.task.add_done_callback(self._task_done)
        self.operations[op_id] = operation

    async def _refuse(self, op_id: str, code: str, message: str, **extra: Any) -> None:
        error = {"message": message, "extensions": {"code": code, **extra}}
        refused: Any = {"id": op_id, "type": "error", "payload": [error]}
        await self.send_message(refused)

    async def run_operation(self, operation: Operation[dict[str, Any], None]) -> None:
        """Run one operation; whatever fails is an ``error`` message, never a closed socket."""
        try:
            source = await self.schema.stream(
                operation.query,
                variable_values=operation.variables,
                context_value=self.context,
                root_value=self.root_value,
                operation_name=operation.operation_name,
            )
            async with aclosing(source):
                first = True
                async for result in source:
                    if first and isinstance(result, PreExecutionError):
                        await operation.send_initial_errors(result.errors or [])
                        return
                    if not isinstance(result, ExecutionResult):
                        await operation.send_initial_errors(
                            [GraphQLError("incremental delivery is not supported over WebSocket")]
                        )
                        return
                    await operation.send_next(result)
                    first = False
            await operation.send_operation_message({"id": operation.id, "type": "complete"})
        except asyncio.CancelledError:
            raise
        except GraphQLError as exc:
            with contextlib.suppress(Exception):
                await operation.send_initial_errors([exc])
        except Exception as exc:
            # One line, no traceback: the traceback's locals would quote the query.
            log.error("ws_operation_failed", error=type(exc).__name__)
            with contextlib.suppress(Exception):
                await operation.send_initial_errors(
                    [GraphQLError("internal error", extensions={"code": errors.INTERNAL})]
                )
        finally:
            self.operations.pop(operation.id, None)

    def forget_id(self, id: str) -> None:
        self.operations.pop(id, None)
