"""The transport seam: how the client gets an answer's bytes for a request payload.

:class:`BaseTransport` holds what every transport shares: ``open``/``close`` (also as an async
context manager), ``post(path, payload) -> bytes`` with retries (exponential backoff, full
jitter) around one attempt, and the ``retries`` count. A transport implements one attempt,
:meth:`BaseTransport.send_once`, raising :class:`TransportError` with ``retryable`` set on
failure. :class:`MockTransport` answers from a function, with no sockets (tests, dry runs);
``HTTPTransport`` (``_http.py``) is the real one.

Every error a transport raises, and every retry it logs, passes through its redactor first
(``_redact.py``): the secrets it was given and any recognisable credential become ``***``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from ._h1 import give_back
from ._redact import Redactor

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
    """How often and how patiently a failed request is tried again.

    A retryable failure is retried while the request has made fewer than ``max_attempts``
    tries **or** less than ``max_elapsed`` seconds have passed since its first try began; it
    gives up once both are spent. So an outage shorter than ``max_elapsed`` is survived however
    many tries it eats, and ``max_attempts`` still grants that many tries when each one takes
    long (a timeout). ``max_elapsed=0`` counts tries only.

    The delay before retry ``i`` (0-based) is uniform in
    ``[0, min(max_delay, base_delay * 2**i)]`` (full jitter).
    """

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_elapsed: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("base_delay", "max_delay", "max_elapsed"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2.0 ** min(retry, 64))))

    def should_retry(self, attempts: int, elapsed: float) -> bool:
        """Whether a request that has failed ``attempts`` times (retryably), ``elapsed``
        seconds after its first try began, is tried again."""
        return attempts < self.max_attempts or elapsed < self.max_elapsed


class BaseTransport:
    """POST a JSON payload to a path, get the raw answer back, retrying per ``retry``.

    Subclasses implement :meth:`send_once` (one attempt) and, if they hold connections,
    :meth:`open` and :meth:`close`. ``seed`` seeds the jitter (for reproducible tests).
    ``secrets`` (an API key, a password) never appear in the errors :meth:`post` raises nor in
    its log lines: :meth:`redact` replaces them, and any recognisable credential, with ``***``.
    """

    def __init__(self, *, retry: RetryPolicy | None = None, seed: int | None = None,
                 secrets: Iterable[str | None] = ()) -> None:
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self._redactor = Redactor(secrets)
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

    def redact(self, text: str) -> str:
        """``text`` with this transport's secrets and any recognisable credential (URL
        userinfo, bearer / basic tokens, authorization headers) replaced by ``***``."""
        return self._redactor(text)

    async def send_once(self, path: str, payload: Any) -> bytes | memoryview:
        """One attempt; raise :class:`TransportError` (``retryable`` set) on failure."""
        raise NotImplementedError

    def recycle(self, body: bytes | memoryview | None) -> None:
        """Take back a body :meth:`post_view` returned, once its caller is done with it: a
        body read into a pooled receive buffer (by an :class:`HTTPTransport`, also one this
        transport delegates to) goes back to its pool; the body must not be used again."""
        give_back(body)

    async def post(self, path: str, payload: Any) -> bytes:
        """POST ``payload`` to ``path``; return the raw response body as ``bytes``.

        Raises :class:`TransportError` as :meth:`post_view` does.
        """
        body = await self.post_view(path, payload)
        if isinstance(body, bytes):
            return body
        out = bytes(body)
        self.recycle(body)
        return out

    async def post_view(self, path: str, payload: Any) -> bytes | memoryview:
        """POST ``payload`` to ``path``; return the raw response body: ``bytes``, or a
        ``memoryview`` of a buffer the transport reuses once given back with :meth:`recycle`.

        Raises :class:`TransportError` (or a subclass), its message redacted, once the request
        has failed for good: on a failure that is not retryable, or when ``retry`` says to
        stop (:meth:`RetryPolicy.should_retry`).
        """
        await self.open()
        policy = self.retry
        start = self._now()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.send_once(path, payload)
            except TransportError as e:
                e.attempts = attempt
                self._scrub(e)
                if not e.retryable:
                    raise
                elapsed = self._now() - start
                if not policy.should_retry(attempt, elapsed):
                    e.args = (f"{e.args[0]} (gave up after {attempt} attempts in "
                              f"{elapsed:.1f} s)",)
                    raise
                last = e
            delay = policy.delay(attempt - 1, self._rng)
            self.retries += 1
            log.info("retrying POST %s in %.2fs (attempt %d, %.1f s since the first): %s",
                     self.redact(self.url(path)), delay, attempt + 1, self._now() - start, last)
            await self._sleep(delay)

    def _scrub(self, e: TransportError) -> None:
        """Redact the error's message (and its body snippet, for an HTTP error) in place."""
        e.args = tuple(self.redact(a) if isinstance(a, str) else a for a in e.args)
        snippet = getattr(e, "snippet", None)
        if isinstance(snippet, str):
            e.snippet = self.redact(snippet)  # type: ignore[attr-defined]

    def _now(self) -> float:
        """The clock the time budget is measured on (monotonic seconds)."""
        return time.monotonic()

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` before a retry."""
        await asyncio.sleep(seconds)


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
    ``secrets`` are redacted from its errors as an ``HTTPTransport`` redacts its key.

    .. code-block:: python

        sglang = get_protocol("sglang")

        def handler(path, payload):  # what SGLang's /generate would answer
            return sglang.encode_response(payload, [Completion(output_ids, routing)])

        RolloutClient("mock://engine", "sglang", geometry, transport=MockTransport(handler))
    """

    def __init__(self, handler: Handler, *, retry: RetryPolicy | None = None,
                 seed: int | None = None, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(retry=retry or RetryPolicy(max_attempts=1, max_elapsed=0.0),
                         seed=seed, secrets=secrets)
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
