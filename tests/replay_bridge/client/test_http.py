"""The HTTP transport over real sockets: retries (and when not), timeouts, the size cap, the
bearer token."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from aiohttp import web

from replay_bridge.client import (HTTPError, HTTPTransport, ResponseTooLarge, RetryPolicy,
                                  TransportError, free_port)

from .conftest import running

FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01, max_elapsed=0.0)


def counting_app(statuses: list[int], body: bytes = b'{"ok": true}',
                 delay: float = 0.0) -> tuple[web.Application, list[web.Request]]:
    """Answer the i-th request with ``statuses[i]`` (the last one repeats)."""
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, body=body if status < 400 else b"server says no")

    app = web.Application()
    app.router.add_post("/generate", handler)
    return app, seen


def test_retries_5xx_then_succeeds() -> None:
    async def go() -> None:
        app, seen = counting_app([503, 502, 200])
        async with running(app) as url, HTTPTransport(url, retry=FAST) as t:
            assert await t.post("/generate", {"x": 1}) == b'{"ok": true}'
            assert len(seen) == 3
            assert t.retries == 2
    asyncio.run(go())


def test_gives_up_after_budget_on_5xx() -> None:
    async def go() -> None:
        app, seen = counting_app([500])
        async with running(app) as url, HTTPTransport(url, retry=FAST) as t:
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {})
            assert ei.value.status == 500 and ei.value.attempts == 4
            assert "gave up after 4 attempts" in str(ei.value)
            assert len(seen) == 4
    asyncio.run(go())


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_never_retries_4xx(status: int) -> None:
    async def go() -> None:
        app, seen = counting_app([status, 200])
        async with running(app) as url, HTTPTransport(url, retry=FAST) as t:
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {})
            assert ei.value.status == status and not ei.value.retryable
            assert "server says no" in str(ei.value)
            assert len(seen) == 1
    asyncio.run(go())


def test_timeout_is_retried_then_fails() -> None:
    async def go() -> None:
        app, seen = counting_app([200], delay=0.5)
        async with running(app) as url, \
                HTTPTransport(url, timeout=0.05, retry=FAST) as t:
            with pytest.raises(TransportError) as ei:
                await t.post("/generate", {})
            assert ei.value.retryable and "timeout" in str(ei.value)
        assert len(seen) == 4
    asyncio.run(go())


def test_connection_refused_is_retried() -> None:
    port = free_port()  # a port nobody listens on

    async def go() -> None:
        async with HTTPTransport(f"http://127.0.0.1:{port}", retry=FAST) as t:
            with pytest.raises(TransportError) as ei:
                await t.post("/generate", {})
            assert ei.value.attempts == 4 and t.retries == 3
    asyncio.run(go())


def test_size_cap_with_content_length_not_retried() -> None:
    async def go() -> None:
        app, seen = counting_app([200], body=b"x" * 5000)
        async with running(app) as url, \
                HTTPTransport(url, retry=FAST, max_response_bytes=4096) as t:
            with pytest.raises(ResponseTooLarge, match="over the 4096-byte cap"):
                await t.post("/generate", {})
            assert len(seen) == 1
    asyncio.run(go())


def test_size_cap_on_chunked_body() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 1000)
        await resp.write_eof()
        return resp

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/generate", handler)
        async with running(app) as url:
            async with HTTPTransport(url, retry=FAST, max_response_bytes=4096) as t:
                with pytest.raises(ResponseTooLarge, match="exceeds the 4096-byte cap"):
                    await t.post("/generate", {})
            async with HTTPTransport(url, retry=FAST, max_response_bytes=20_000) as t:
                assert await t.post("/generate", {}) == b"y" * 10_000
    asyncio.run(go())


def test_bearer_token_sent_and_never_logged(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-test-5b1f0c9e7d"
    monkeypatch.setenv("MY_ENGINE_KEY", secret)
    caplog.set_level(logging.DEBUG)

    async def go() -> None:
        app, seen = counting_app([503, 401])
        async with running(app) as url, \
                HTTPTransport(url, retry=FAST, api_key_env="MY_ENGINE_KEY") as t:
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {"input_ids": [1]})
            assert [r.headers.get("Authorization") for r in seen] == [f"Bearer {secret}"] * 2
            assert secret not in str(ei.value) and secret not in repr(ei.value)
            assert secret not in repr(t)
        assert "retrying" in caplog.text  # the retry was logged ...
        assert secret not in caplog.text  # ... without the token
    asyncio.run(go())


def test_no_token_no_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLAY_BRIDGE_API_KEY", raising=False)

    async def go() -> None:
        app, seen = counting_app([200])
        async with running(app) as url, HTTPTransport(url, retry=FAST) as t:
            await t.post("/generate", {})
        assert "Authorization" not in seen[0].headers
    asyncio.run(go())


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=4.0)
    rng = random.Random(0)
    for retry in range(8):
        cap = min(4.0, 0.5 * 2 ** retry)
        delays = [policy.delay(retry, rng) for _ in range(400)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap  # spread over [0, cap]
