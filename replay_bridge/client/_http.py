"""HTTP transport: one aiohttp session, per-request timeout, retries with exponential backoff and
full jitter (from :class:`~._transport.BaseTransport`), a cap on response size, and a bearer
token read from the environment.

Retried: connection errors, timeouts and 5xx answers. Never retried: 4xx answers, an oversized
response, a response that is not what the caller can read. The token goes into the
``Authorization`` header of each request only; it is never logged, never part of an error
message and never stored.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import orjson

from ._transport import BaseTransport, RetryPolicy, TransportError

__all__ = ["DEFAULT_API_KEY_ENV", "HTTPError", "HTTPTransport", "ResponseTooLarge"]

DEFAULT_API_KEY_ENV = "REPLAY_BRIDGE_API_KEY"


class HTTPError(TransportError):
    """An HTTP error status; ``body`` holds the start of the answer (for diagnostics)."""

    def __init__(self, status: int, url: str, body: bytes, attempts: int = 1) -> None:
        snippet = body[:300].decode("utf-8", "replace")
        super().__init__(f"HTTP {status} from {url}: {snippet}", retryable=status >= 500,
                         attempts=attempts)
        self.status = status


class ResponseTooLarge(TransportError):
    """The answer exceeded the response-size cap; it is not retried."""


class HTTPTransport(BaseTransport):
    """POST JSON over HTTP, get bytes back: the only place the client touches the network."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        max_response_bytes: int = 1 << 30,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        connection_limit: int = 0,
        read_bufsize: int = 4194304,
        seed: int | None = None,
    ) -> None:
        super().__init__(retry=retry, seed=seed)
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.max_response_bytes = int(max_response_bytes)
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._connection_limit = connection_limit
        self.read_bufsize = read_bufsize
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        auth = "bearer" if "Authorization" in self._headers else "none"
        return f"HTTPTransport({self.endpoint!r}, auth={auth})"

    async def open(self) -> None:
        if self._session is None:
            conn = aiohttp.TCPConnector(limit=self._connection_limit, force_close=False)
            self._session = aiohttp.ClientSession(connector=conn, headers=self._headers,
                                                  read_bufsize=self.read_bufsize)
            # aiohttp logs nothing of headers; our own log lines never carry them either.

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        return self.endpoint + path

    async def send_once(self, path: str, payload: Any) -> bytes:
        """One POST of ``payload`` as JSON to ``endpoint + path``; connection errors and
        timeouts become retryable :class:`TransportError`."""
        await self.open()
        url = self.url(path)
        try:
            return await self._post_once(url, orjson.dumps(payload))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            kind = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            raise TransportError(f"{kind} on POST {url}: {e}".rstrip(": "),
                                 retryable=True) from None

    async def _post_once(self, url: str, data: bytes) -> bytes:
        assert self._session is not None
        cap = self.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with self._session.post(url, data=data, timeout=timeout) as resp:
            length = resp.content_length
            if length is not None and length > cap:
                raise ResponseTooLarge(
                    f"response from {url} is {length} bytes, over the {cap}-byte cap",
                    retryable=False)
            if resp.status >= 400:
                raise HTTPError(resp.status, url, await resp.content.read(4096))
            # Chunks as received (no intermediate joins), one copy at the end.
            chunks, size = [], 0
            async for chunk, _ in resp.content.iter_chunks():
                size += len(chunk)
                if size > cap:
                    raise ResponseTooLarge(
                        f"response from {url} exceeds the {cap}-byte cap", retryable=False)
                chunks.append(chunk)
            return b"".join(chunks)
