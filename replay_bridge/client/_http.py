"""HTTP transport: one aiohttp session, per-request timeout, retries with exponential backoff and
full jitter, a cap on response size, and a bearer token read from the environment.

Retried: connection errors, timeouts and 5xx answers. Never retried: 4xx answers, an oversized
response, a response that is not what the caller can read. The token goes into the
``Authorization`` header of each request only; it is never logged, never part of an error
message and never stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

__all__ = ["HTTPError", "ResponseTooLarge", "RetryPolicy", "Transport", "TransportError"]

log = logging.getLogger("replay_bridge.client")

DEFAULT_API_KEY_ENV = "REPLAY_BRIDGE_API_KEY"


class TransportError(RuntimeError):
    """A request that failed for good (after the retry budget, or on an answer never retried).

    ``retryable`` tells whether the last failure was of a kind that is retried (a connection
    error, a timeout, a 5xx); ``attempts`` counts the tries made.
    """

    def __init__(self, message: str, *, retryable: bool, attempts: int = 1) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts


class HTTPError(TransportError):
    """An HTTP error status; ``body`` holds the start of the answer (for diagnostics)."""

    def __init__(self, status: int, url: str, body: bytes, attempts: int = 1) -> None:
        snippet = body[:300].decode("utf-8", "replace")
        super().__init__(f"HTTP {status} from {url}: {snippet}", retryable=status >= 500,
                         attempts=attempts)
        self.status = status


class ResponseTooLarge(TransportError):
    """The answer exceeded the response-size cap; it is not retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried.

    Delay before retry ``i`` (0-based) is uniform in ``[0, min(max_delay, base_delay * 2**i)]``
    (full jitter).
    """

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2.0 ** retry)))


class Transport:
    """POST JSON, get bytes back: the only place the client touches the network."""

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
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_response_bytes = int(max_response_bytes)
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._connection_limit = connection_limit
        self.read_bufsize = read_bufsize
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random(seed)
        self.retries = 0
        """Retries made so far (all requests)."""

    def __repr__(self) -> str:
        auth = "bearer" if "Authorization" in self._headers else "none"
        return f"Transport({self.endpoint!r}, auth={auth})"

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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

    async def post(self, path: str, payload: Any) -> bytes:
        """POST ``payload`` as JSON to ``endpoint + path``; return the raw response body.

        Raises :class:`TransportError` (or a subclass) once the request has failed for good.
        """
        await self.open()
        assert self._session is not None
        url = self.endpoint + path
        data = orjson.dumps(payload)
        attempts = self.retry.max_attempts
        last: TransportError | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.retry.delay(attempt - 1, self._rng)
                self.retries += 1
                log.info("retrying POST %s in %.2fs (attempt %d/%d): %s",
                         url, delay, attempt + 1, attempts, last)
                await asyncio.sleep(delay)
            try:
                return await self._post_once(url, data)
            except TransportError as e:
                e.attempts = attempt + 1
                if not e.retryable:
                    raise
                last = e
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                kind = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
                last = TransportError(f"{kind} on POST {url}: {e}".rstrip(": "),
                                      retryable=True, attempts=attempt + 1)
        assert last is not None
        last.args = (f"{last.args[0]} (gave up after {attempts} attempts)",)
        raise last

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
