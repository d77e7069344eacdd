"""A real browser (headless Chromium) loads Bridge's GraphiQL page, runs a query, sees the result.

Chromium is driven over the DevTools protocol. The page and its assets come from Bridge itself
(the network is closed), so this also proves GraphiQL works offline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import sys
from typing import Any

import pytest
import websockets

from pkg.clients.signalman import SignalmanClient
from pkg.devstack.install import InstallError, chromium_binary
from pkg.devstack.servers import free_port
from pkg.events.sink import Event
from tests.bridge.fakes import SECRET, token
from tests.bridge.stack import http_client, wait_for

pytestmark = pytest.mark.integration


class DevTools:
    """A minimal DevTools-protocol session on one page."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 15))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


@pytest.fixture
def chromium() -> str:
    try:
        return str(chromium_binary())
    except InstallError as exc:
        pytest.fail(f"chromium is required for the browser check: {exc}")


async def test_graphiql_page_runs_a_query_in_a_real_browser(process_factory, chromium, tmp_path):
    bridge = process_factory(
        "bridge", [sys.executable, "-m", "api_gateway", "--port", "{port}", "--id", "browser"]
    )
    debug_port = free_port()
    profile = tmp_path / "chromium-profile"  # a fresh profile, removed with tmp_path
    process_factory(
        "chromium",
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         f"--remote-debugging-port={debug_port}", "about:blank"],
        port=debug_port,
    )  # fmt: skip
    async with http_client() as client:

        async def page_target() -> str | None:
            targets = (await client.get(f"http://127.0.0.1:{debug_port}/json/list")).json()
            pages = [t for t in targets if t.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        ws_url = await wait_for(page_target, timeout=20)
        assert ws_url, "chromium exposed no page target"

    async with websockets.connect(ws_url, max_size=None) as ws:
        dt = DevTools(ws)
        await dt.call("Page.enable")
        await dt.call("Runtime.enable")
        await dt.call("Page.navigate", url=f"http://127.0.0.1:{bridge.port}/graphql")

        async def editor_ready() -> bool:
            return bool(
                await dt.eval(
                    "!!document.querySelector('.graphiql-query-editor .CodeMirror')"
                    " && !!document.querySelector('.graphiql-execute-button')"
                )
            )

        assert await wait_for(editor_ready, timeout=30), "GraphiQL did not render"
        await dt.eval(
            "document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror"
            ".setValue('{ me { anonymous name } }')"
        )
        await dt.eval("document.querySelector('.graphiql-execute-button').click()")

        async def result_text() -> str | None:
            text = await dt.eval(
                "(() => { const cm = document.querySelector('.graphiql-response .CodeMirror');"
                " return cm ? cm.CodeMirror.getValue() : null; })()"
            )
            return text if text and "anonymous" in text else None

        text = await wait_for(result_text, timeout=30)
        assert text, "no result rendered in the response pane"
        assert json.loads(text) == {"data": {"me": {"anonymous": True, "name": "anonymous"}}}


async def test_the_graphiql_page_relays_a_subscription_over_websocket(
    process_factory, chromium, tmp_path
):
    grpc_port = free_port()
    process_factory(
        "signalman",
        [sys.executable, "-m", "api_realtime", "--grpc-port", str(grpc_port),
         "--http-port", str(free_port()), "--replica-id", "sig-b"],
        env={"PLATFORM_TOKENS": "sig-acme=bridge@acme:tenant-user,pub-acme=pub:system"},
        port=grpc_port,
    )  # fmt: skip
    bridge = process_factory(
        "bridge",
        [sys.executable, "-m", "api_gateway", "--port", "{port}", "--id", "browser-sub"],
        env={
            "BRIDGE_JWT_HS256_SECRET": SECRET,
            "BRIDGE_SIGNALMAN_ADDRESSES": f"127.0.0.1:{grpc_port}",
            "BRIDGE_SIGNALMAN_TOKENS": "acme=sig-acme",
        },
    )
    dt_port = free_port()
    process_factory(
        "chromium",
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'p'}",
         f"--remote-debugging-port={dt_port}", "about:blank"],
        port=dt_port,
    )  # fmt: skip
    publisher = SignalmanClient([f"127.0.0.1:{grpc_port}"], token="pub-acme")
    try:
        async with http_client() as client:

            async def page_target() -> str | None:
                targets = (await client.get(f"http://127.0.0.1:{dt_port}/json/list")).json()
                pages = [t for t in targets if t.get("type") == "page"]
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            ws_url = await wait_for(page_target, timeout=20)
        async with websockets.connect(ws_url, max_size=None) as ws:
            dt = DevTools(ws)
            await dt.call("Runtime.enable")
            await dt.call("Page.navigate", url=f"http://127.0.0.1:{bridge.port}/graphql")
            assert await wait_for(lambda: dt.eval("typeof fetcher === 'function'"), timeout=30)
            # The page's own fetcher (what GraphiQL calls) opens the subscription.
            query = 'subscription { tenantEvents(channels: ["nodes"]) { type tenant } }'
            await dt.eval(
                "window.firstEvent = null; (async () => {"
                f" const it = await fetcher({{query: {json.dumps(query)}}},"
                f" {{headers: {{Authorization: 'Bearer {token('acme')}'}}}});"
                " const first = await it.next(); window.firstEvent = JSON.stringify(first.value);"
                " })()"
            )

            async def relayed() -> str | None:
                event = Event(type="node.updated", tenant="acme", data={})
                await publisher.publish([json.dumps(dataclasses.asdict(event))])
                return await dt.eval("window.firstEvent")

            seen = await wait_for(relayed, timeout=30, interval=0.5)
            assert seen, "the page received no subscription event"
            assert json.loads(seen) == {
                "data": {"tenantEvents": {"type": "node.updated", "tenant": "acme"}}
            }
    finally:
        await publisher.close()
