"""A caller outside the platform: a fresh script, its own tiny gRPC server, pkg.clients' defaults.

The script knows nothing of the platform (no project protos, no devstack, no logging set up):
a plain ``grpc.aio.server()`` with grpc's defaults serving raw bytes, called through
``aio_channel``/``sync_channel`` with no policy at all, then with the adaptive limit switched
on without tuning; every misconfiguration a newcomer is likely to write fails at construction
with a ``ValueError`` naming the setting. It runs in a subprocess from an empty directory, so
nothing of the test session (fixtures, configured logging, a shared runtime) helps it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

_SCRIPT = textwrap.dedent(
    """
    import asyncio, json

    import grpc
    import grpc.aio

    import pkg.clients as clients

    seen = {"GetItem": 0, "Checkout": 0}


    async def get_item(request, context):
        seen["GetItem"] += 1
        if seen["GetItem"] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return b"item:" + request


    async def checkout(request, context):
        # What a server relaying its database driver's error says: text that reads like the
        # client's own connect failure, although this request plainly reached the server.
        seen["Checkout"] += 1
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: Connection refused",
        )


    def handler(fn):
        return grpc.unary_unary_rpc_method_handler(fn)  # bytes in, bytes out


    async def main():
        server = grpc.aio.server()  # grpc's defaults: no keepalive permissions, no shedding
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(
                "shop.v1.Shop", {"GetItem": handler(get_item), "Checkout": handler(checkout)}
            )]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"127.0.0.1:{port}"
        out = {}

        # Defaults: no policy given. Without a contract nothing says GetItem is safe to run
        # twice, so its UNAVAILABLE reaches the caller; Checkout runs once despite its text.
        channel = clients.aio_channel(target)
        get_item_call = channel.unary_unary("/shop.v1.Shop/GetItem")
        checkout_call = channel.unary_unary("/shop.v1.Shop/Checkout")
        try:
            await get_item_call(b"1", timeout=2)
        except grpc.aio.AioRpcError as exc:
            out["default_get_item"] = exc.code().name
        try:
            await checkout_call(b"cart", timeout=2)
        except grpc.aio.AioRpcError as exc:
            out["checkout"] = exc.code().name
        out["checkout_runs"] = seen["Checkout"]
        out["default_get_item_ok"] = (await get_item_call(b"2", timeout=2)).decode()
        await channel.close()

        # Listing the method as idempotent (what a contract's idempotency_level would say)
        # makes the retry happen; the adaptive limit, switched on untuned, lets it through.
        seen["GetItem"] = 0
        policy = clients.Policy(
            timeout=2.0,
            retry=clients.RetryPolicy(idempotent_methods=("/shop.v1.Shop/GetItem",)),
            limiter=clients.LimiterPolicy(enabled=True),
        )
        channel = clients.aio_channel(target, policy)
        reply = await channel.unary_unary("/shop.v1.Shop/GetItem")(b"3", timeout=2)
        out["retried_get_item"] = reply.decode()
        out["retried_attempts"] = seen["GetItem"]
        replies = await asyncio.gather(
            *(channel.unary_unary("/shop.v1.Shop/GetItem")(b"4", timeout=2) for _ in range(20))
        )
        out["limited_burst_ok"] = sum(r == b"item:4" for r in replies)
        await channel.close()

        # The blocking channel works with defaults too (the call runs in a thread: the server
        # shares this event loop).
        sync = clients.sync_channel(target)
        reply = await asyncio.to_thread(sync.unary_unary("/shop.v1.Shop/GetItem"), b"5", timeout=2)
        out["sync_get_item"] = reply.decode()
        sync.close()

        errors = {}
        attempts = {
            "negative_timeout": lambda: clients.Policy(timeout=-1),
            "pattern_without_slash": lambda: clients.RetryPolicy(
                idempotent_methods=("shop.v1.Shop/GetItem",)
            ),
            "limiter_bounds": lambda: clients.LimiterPolicy(min_limit=5, initial_limit=2),
            "limiter_thresholds": lambda: clients.LimiterPolicy(alpha=6.0, beta=3.0),
            "policy_not_a_policy": lambda: clients.aio_channel(target, {"timeout": 1}),
            "bad_target": lambda: clients.aio_channel("http://shop:80"),
        }
        for name, build in attempts.items():
            try:
                build()
            except ValueError as exc:
                errors[name] = str(exc)
            else:
                errors[name] = None
        out["errors"] = errors
        await server.stop(None)
        return out


    result = asyncio.run(main())
    with open("result.json", "w") as f:
        json.dump(result, f)
    """
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs the script once (from an empty directory) and returns what it recorded."""
    where = tmp_path_factory.mktemp("outside")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads((where / "result.json").read_text())
    result["stdout"], result["stderr"] = done.stdout, done.stderr
    return result


_GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+\.cc:\d+\]")


def test_a_fresh_script_with_its_own_server_works_with_the_defaults(
    outcome: dict[str, Any],
) -> None:
    out = outcome
    # Nothing configured logging: the library prints nothing of its own. gRPC's C core may log a
    # transport event of its own (e.g. "Got goaway" when the script's server stops): its lines
    # have their own format and are not pkg.clients speaking.
    ours = [line for line in out["stderr"].splitlines() if not _GRPC_CORE_LINE.match(line)]
    assert out["stdout"] == "" and ours == []
    assert out["default_get_item"] == "UNAVAILABLE"  # not known to be safe: not retried
    assert out["default_get_item_ok"] == "item:2"
    assert out["checkout"] == "UNAVAILABLE"
    assert out["checkout_runs"] == 1  # the server's text is not proof it was never sent
    assert out["retried_get_item"] == "item:3"
    assert out["retried_attempts"] == 2
    # A burst as large as the untuned limit's start (20) to a healthy server: none refused.
    assert out["limited_burst_ok"] == 20
    assert out["sync_get_item"] == "item:5"


def test_a_fresh_script_gets_a_clear_error_for_each_bad_setting(outcome: dict[str, Any]) -> None:
    errors = outcome["errors"]
    assert "policy.timeout" in errors["negative_timeout"]
    assert "'shop.v1.Shop/GetItem'" in errors["pattern_without_slash"]
    assert "min_limit <= initial_limit" in errors["limiter_bounds"]
    assert "alpha < beta" in errors["limiter_thresholds"]
    assert "Policy" in errors["policy_not_a_policy"]
    assert "http://shop:80" in errors["bad_target"]
