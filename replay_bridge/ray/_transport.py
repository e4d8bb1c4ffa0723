"""One transport over several engine endpoints: each attempt goes to the next endpoint in turn,
so a worker with a share of several endpoints spreads its requests over them, and a retry of a
failed request lands on another endpoint."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from ..client import BaseTransport, HTTPTransport, RetryPolicy

__all__ = ["RoundRobinTransport"]


class RoundRobinTransport(BaseTransport):
    """POST each attempt to the next of ``endpoints`` (one :class:`HTTPTransport` each, built
    with ``http_options``); the retry policy is this transport's, the redaction every inner
    transport's."""

    def __init__(self, endpoints: Sequence[str], *, retry: RetryPolicy | None = None,
                 seed: int | None = None, **http_options: Any) -> None:
        if not endpoints:
            raise ValueError("RoundRobinTransport needs at least one endpoint")
        super().__init__(retry=retry, seed=seed)
        self.inner = [HTTPTransport(e, **http_options) for e in endpoints]
        self._next = itertools.cycle(self.inner)

    def __repr__(self) -> str:
        return f"RoundRobinTransport({', '.join(repr(t) for t in self.inner)})"

    async def open(self) -> None:
        for t in self.inner:
            await t.open()

    async def close(self) -> None:
        for t in self.inner:
            await t.close()

    def url(self, path: str) -> str:
        return " | ".join(t.url(path) for t in self.inner)

    def redact(self, text: str) -> str:
        for t in self.inner:
            text = t.redact(text)
        return super().redact(text)

    async def send_once(self, path: str, payload: Any) -> bytes:
        return await next(self._next).send_once(path, payload)
