"""The transport seam: how the client gets an answer's bytes for a request payload.

:class:`BaseTransport` holds what every transport shares: ``open``/``close`` (also as an async
context manager), ``post(path, payload) -> bytes`` with retries (exponential backoff, full
jitter) around one attempt, and the ``retries`` count. A transport implements one attempt,
:meth:`BaseTransport.send_once`, raising :class:`TransportError` with ``retryable`` set on
failure. :class:`MockTransport` answers from a function, with no sockets (tests, dry runs);
``HTTPTransport`` (``_http.py``) is the real one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

__all__ = ["BaseTransport", "Handler", "MockTransport", "RetryPolicy", "TransportError"]

log = logging.getLogger("replay_bridge.client")

T = TypeVar("T", bound="BaseTransport")


class TransportError(RuntimeError):
    """A request that failed for good (after the retry budget, or on an answer never retried).

    ``retryable`` tells whether the last failure was of a kind that is retried (a connection
    error, a timeout, a 5xx); ``attempts`` counts the tries made.
    """

    def __init__(self, message: str, *, retryable: bool, attempts: int = 1) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts


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


class BaseTransport:
    """POST a JSON payload to a path, get the raw answer back, retrying per ``retry``.

    Subclasses implement :meth:`send_once` (one attempt) and, if they hold connections,
    :meth:`open` and :meth:`close`. ``seed`` seeds the jitter (for reproducible tests).
    """

    def __init__(self, *, retry: RetryPolicy | None = None, seed: int | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self.retries = 0
        """Retries made so far (all requests)."""

    async def __aenter__(self: T) -> T:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Get ready to send (idempotent)."""

    async def close(self) -> None:
        """Release what :meth:`open` took; the transport can be opened again."""

    def url(self, path: str) -> str:
        """What log lines and error messages call the target of ``path``."""
        return path

    async def send_once(self, path: str, payload: Any) -> bytes:
        """One attempt; raise :class:`TransportError` (``retryable`` set) on failure."""
        raise NotImplementedError

    async def post(self, path: str, payload: Any) -> bytes:
        """POST ``payload`` to ``path``; return the raw response body.

        Raises :class:`TransportError` (or a subclass) once the request has failed for good:
        on a failure that is not retryable, or after ``retry.max_attempts`` attempts.
        """
        await self.open()
        attempts = self.retry.max_attempts
        last: TransportError | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.retry.delay(attempt - 1, self._rng)
                self.retries += 1
                log.info("retrying POST %s in %.2fs (attempt %d/%d): %s",
                         self.url(path), delay, attempt + 1, attempts, last)
                await asyncio.sleep(delay)
            try:
                return await self.send_once(path, payload)
            except TransportError as e:
                e.attempts = attempt + 1
                if not e.retryable:
                    raise
                last = e
        assert last is not None
        last.args = (f"{last.args[0]} (gave up after {attempts} attempts)",)
        raise last


Handler = Callable[[str, Any], Any]
"""``handler(path, payload)``: the answer (``bytes``, or JSON-serialisable), or an awaitable of
it; raises :class:`TransportError` for a failed request."""


class MockTransport(BaseTransport):
    """Answer every request from ``handler(path, payload)``: no sockets, no server.

    The handler is sync or async; it returns the body as ``bytes`` (anything else is
    serialised with orjson, so a canned ``dict`` works too) or raises
    :class:`TransportError` (``retryable=True`` for what HTTP would retry: a 5xx, a timeout).
    It gets the payload as the engine would: serialised to JSON and parsed back, so a payload
    that HTTP could not send fails here too. Without ``retry`` each request is tried once.

    .. code-block:: python

        sglang = get_protocol("sglang")

        def handler(path, payload):  # what SGLang's /generate would answer
            return sglang.encode_response(payload, [Completion(output_ids, routing)])

        RolloutClient("mock://engine", "sglang", geometry, transport=MockTransport(handler))
    """

    def __init__(self, handler: Handler, *, retry: RetryPolicy | None = None,
                 seed: int | None = None) -> None:
        super().__init__(retry=retry or RetryPolicy(max_attempts=1), seed=seed)
        self.handler = handler

    def __repr__(self) -> str:
        name = getattr(self.handler, "__qualname__", type(self.handler).__name__)
        return f"MockTransport({name})"

    async def send_once(self, path: str, payload: Any) -> bytes:
        answer = self.handler(path, orjson.loads(orjson.dumps(payload)))
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, (bytes, bytearray, memoryview)):
            return bytes(answer)
        return orjson.dumps(answer)
