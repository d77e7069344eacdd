"""HTTP clients against a real local HTTP server (starlette under uvicorn)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from pkg.clients import BreakerOpenError, BreakerPolicy, Policy, RetryPolicy, Runtime
from pkg.clients.http import AsyncHttpClient, HttpClient
from pkg.devstack.servers import free_port
from tests.clients.http_app import ServerThread, hits

pytestmark = pytest.mark.integration

POLICY = Policy(
    retry=RetryPolicy(max_attempts=4, base_backoff=0.01, max_backoff=0.05),
    breaker=BreakerPolicy(enabled=False),
)


@pytest.fixture(scope="module")
def http_server() -> Iterator[ServerThread]:
    server = ServerThread()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def base_url(http_server: ServerThread) -> str:
    return f"http://127.0.0.1:{http_server.port}"


@pytest.fixture
def key() -> str:
    return uuid.uuid4().hex


async def test_get_503_is_retried(base_url, key) -> None:
    async with AsyncHttpClient(base_url, POLICY, token="tok") as client:
        response = await client.get(f"/flaky/{key}", params={"fail": 2}, timeout=5)
    assert response.status_code == 200
    assert response.json() == {"attempt": 3, "auth": "Bearer tok"}


async def test_post_503_without_idempotency_key_is_not_retried(base_url, key) -> None:
    async with AsyncHttpClient(base_url, POLICY) as client:
        response = await client.post(f"/flaky/{key}", params={"fail": 1}, timeout=5)
    assert response.status_code == 503
    assert hits[key] == 1


async def test_post_503_with_idempotency_key_is_retried(base_url, key) -> None:
    async with AsyncHttpClient(base_url, POLICY) as client:
        response = await client.post(
            f"/flaky/{key}", params={"fail": 1}, headers={"Idempotency-Key": key}, timeout=5
        )
    assert response.status_code == 200 and hits[key] == 2


async def test_retry_after_is_honoured(base_url, key) -> None:
    start = time.monotonic()
    async with AsyncHttpClient(base_url, POLICY) as client:
        response = await client.get(
            f"/flaky/{key}", params={"fail": 1, "retry_after": 1}, timeout=5
        )
    assert response.status_code == 200
    assert time.monotonic() - start >= 1.0


async def test_retry_after_beyond_the_deadline_gives_up_at_once(base_url, key) -> None:
    start = time.monotonic()
    async with AsyncHttpClient(base_url, POLICY) as client:
        response = await client.get(
            f"/flaky/{key}", params={"fail": 1, "retry_after": 30}, timeout=2
        )
    assert response.status_code == 503 and hits[key] == 1
    assert time.monotonic() - start < 1.0


async def test_connection_refused_is_retried_even_for_post_then_raised() -> None:
    async with AsyncHttpClient(f"http://127.0.0.1:{free_port()}", POLICY) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/x", timeout=2)


async def test_http_breaker_fails_fast(base_url, key) -> None:
    runtime = Runtime()
    policy = Policy(
        retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(min_calls=3, open_duration=5)
    )
    async with AsyncHttpClient(base_url, policy, runtime=runtime) as client:
        for _ in range(3):
            assert (await client.get(f"/flaky/{key}", params={"fail": -1})).status_code == 503
        with pytest.raises(BreakerOpenError):
            await client.get(f"/flaky/{key}", params={"fail": -1})
    assert hits[key] == 3


def test_sync_client_retries_get_but_not_post(base_url, key) -> None:
    with HttpClient(base_url, POLICY) as client:
        assert client.get(f"/flaky/{key}", params={"fail": 2}, timeout=5).status_code == 200
        assert hits[key] == 3
        post_key = key + "-post"
        assert client.post(f"/flaky/{post_key}", params={"fail": 1}).status_code == 503
        assert hits[post_key] == 1


def test_sync_client_per_attempt_timeout_is_retried(base_url, key) -> None:
    policy = Policy(
        retry=RetryPolicy(attempt_timeout=0.3, base_backoff=0.01, max_backoff=0.02),
        breaker=BreakerPolicy(enabled=False),
    )
    with HttpClient(base_url, policy) as client:
        # Every attempt is slow; each is cut at 0.3 s and retried, the total stays in 1.2 s.
        start = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            client.get(f"/flaky/{key}", params={"delay": 1.0}, timeout=1.2)
        assert time.monotonic() - start < 1.2 + 0.3
    assert hits[key] == 3


async def test_httpx_send_options_apply_to_every_attempt(base_url, key) -> None:
    async with AsyncHttpClient(base_url, POLICY) as client:
        assert (await client.get(f"/redirect/{key}")).status_code == 307
        followed = await client.get(f"/redirect/{key}", follow_redirects=True, timeout=5)
    assert followed.status_code == 200 and followed.json()["attempt"] == 1


def test_a_timeout_that_is_not_seconds_is_refused_before_sending(base_url, key) -> None:
    refused = pytest.raises(ValueError, match="timeout must be a number of seconds")
    with HttpClient(base_url, POLICY) as client, refused:
        client.get(f"/flaky/{key}", timeout=httpx.Timeout(5.0))
    assert hits[key] == 0
