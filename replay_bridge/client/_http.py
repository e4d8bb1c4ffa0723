"""HTTP transport: keep-alive connections, per-request timeout, retries with exponential backoff and
full jitter (from :class:`~._transport.BaseTransport`), a cap on response size, and a bearer
token read from the environment.

Retried: connection errors, timeouts and 5xx answers. Never retried: 4xx answers, an oversized
response, a response that is not what the caller can read. The token goes into the
``Authorization`` header of each request only; it is never logged, never part of an error
message and never stored. Credentials in the endpoint URL (``http://user:pass@host``) are sent
as HTTP Basic auth (unless a token is set: one ``Authorization`` header) and are cut from the
URL every message names; both secrets are redacted from every error, echoed bodies included.

Answers are read by the buffered HTTP/1.1 reader (``_h1.py``, ``reader="buffer"``): the
kernel copies each answer into a warm pooled buffer and the body comes back as a
``memoryview`` of it, which :meth:`HTTPTransport.recycle` hands back once decoded.
``reader="aiohttp"`` reads with an aiohttp session instead (chunks joined into ``bytes``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from ._h1 import BufferPool, H1Client, TooLarge
from ._redact import Redactor, split_userinfo
from ._transport import BaseTransport, RetryPolicy, TransportError

__all__ = ["DEFAULT_API_KEY_ENV", "HTTPError", "HTTPTransport", "ResponseTooLarge"]

DEFAULT_API_KEY_ENV = "REPLAY_BRIDGE_API_KEY"
SNIPPET_CHARS = 200
"""How much of an error answer's body a message quotes (after redaction)."""

log = logging.getLogger("replay_bridge.client")

_CONTROL = re.compile(r"[\x00-\x1f\x7f\s]+")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
"""What a request target keeps as it is; anything else is percent-encoded."""


def _snippet(body: bytes, redact: Callable[[str], str]) -> str:
    """The start of an error body, safe to print: redacted first (so that no secret is cut in
    half at the end), control characters and runs of white space made one space, then cut to
    :data:`SNIPPET_CHARS`."""
    text = _CONTROL.sub(" ", redact(body.decode("utf-8", "replace"))).strip()
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."


class HTTPError(TransportError):
    """An HTTP error status; ``snippet`` holds the redacted start of the answer (diagnostics).

    ``redact`` removes the sender's secrets from ``url`` and ``body`` before the message is
    built; recognisable credentials (URL userinfo, bearer tokens, authorization headers) are
    removed whatever it is.
    """

    def __init__(self, status: int, url: str, body: bytes, attempts: int = 1, *,
                 redact: Callable[[str], str] | None = None) -> None:
        redact = redact or Redactor()
        self.snippet = _snippet(body, redact)
        where = redact(url)
        super().__init__(f"HTTP {status} from {where}: {self.snippet}".rstrip(": "),
                         retryable=status >= 500, attempts=attempts)
        self.status = status


class ResponseTooLarge(TransportError):
    """The answer exceeded the response-size cap; it is not retried."""


class HTTPTransport(BaseTransport):
    """POST JSON over HTTP, get the answer's bytes back: the only place the client touches the
    network.

    ``reader="buffer"`` (the default) returns each body as a ``memoryview`` of a pooled buffer;
    :meth:`recycle` gives the buffer back for the next answer once nothing views it.
    ``reader="aiohttp"`` returns ``bytes`` read by aiohttp (``read_bufsize`` is its stream
    buffer). ``connection_limit`` caps the connections open at once (0: no cap).
    """

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
        reader: Literal["buffer", "aiohttp"] = "buffer",
    ) -> None:
        if reader not in ("buffer", "aiohttp"):
            raise ValueError(f"reader must be 'buffer' or 'aiohttp', got {reader!r}")
        key = os.environ.get(api_key_env) if api_key_env else None
        clean, user, password = split_userinfo(endpoint)
        # A lone user name (``http://TOKEN@host``) is a token too.
        secrets = [key, password, f"{user}:{password}"] if password is not None else [key, user]
        super().__init__(retry=retry, seed=seed, secrets=secrets)
        self.endpoint = clean.rstrip("/")
        """The base URL without its userinfo: what requests go to."""
        self._userinfo = user is not None
        self.timeout = timeout
        self.max_response_bytes = int(max_response_bytes)
        self._headers = {"Content-Type": "application/json"}
        self._auth: aiohttp.BasicAuth | None = None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
            if user is not None:
                log.warning("the credentials in the endpoint URL are not sent: the token from "
                            "$%s is (one Authorization header per request)", api_key_env)
        elif user is not None:
            self._auth = aiohttp.BasicAuth(user, password or "")
        self._connection_limit = connection_limit
        self.read_bufsize = read_bufsize
        self.reader = reader
        self._session: aiohttp.ClientSession | None = None
        self._h1: H1Client | None = None
        self._pool = BufferPool()
        self._head: tuple[str, str] | None = None

    def __repr__(self) -> str:
        auth = "bearer" if "Authorization" in self._headers else \
            "basic" if self._auth is not None else "none"
        return f"HTTPTransport({self.url('')!r}, auth={auth})"

    def _request_head(self) -> tuple[str, str]:
        """The request line's path prefix and the fixed header lines (``reader="buffer"``);
        ``ValueError`` when a header value holds a line break."""
        parts = urlsplit(self.endpoint)
        headers = {"Host": parts.netloc, **self._headers, "Accept-Encoding": "identity"}
        if self._auth is not None:
            headers["Authorization"] = self._auth.encode()
        if any(c in v for v in headers.values() for c in "\r\n\0"):
            raise ValueError("a request header value holds a line break or NUL")
        return parts.path, "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def open(self) -> None:
        if self.reader == "buffer":
            if self._h1 is None:
                parts = urlsplit(self.endpoint)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError(f"not an http(s) endpoint: {self.url('')!r}")
                tls = parts.scheme == "https"
                self._h1 = H1Client(parts.hostname, parts.port or (443 if tls else 80),
                                    tls=tls, pool=self._pool, limit=self._connection_limit)
            return
        if self._session is None:
            conn = aiohttp.TCPConnector(limit=self._connection_limit, force_close=False)
            self._session = aiohttp.ClientSession(connector=conn, headers=self._headers,
                                                  auth=self._auth,
                                                  read_bufsize=self.read_bufsize)
            # aiohttp logs nothing of headers; our own log lines never carry them either.

    async def close(self) -> None:
        if self._h1 is not None:
            self._h1.close()
            self._h1 = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        """``endpoint + path`` as messages show it: ``***@`` where the userinfo was."""
        shown = self.redact(self.endpoint + path)
        if self._userinfo:
            scheme, sep, rest = shown.partition("://")
            shown = f"{scheme}{sep}***@{rest}" if sep else shown
        return shown

    async def send_once(self, path: str, payload: Any) -> bytes:
        """One POST of ``payload`` as JSON to ``endpoint + path``; connection errors and
        timeouts become retryable :class:`TransportError`."""
        await self.open()
        url = self.url(path)
        try:
            if self.reader == "buffer":
                return await self._post_buffered(path, url, orjson.dumps(payload))
            return await self._post_once(self.endpoint + path, url, orjson.dumps(payload))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            kind = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            raise TransportError(f"{kind} on POST {url}: {e}".rstrip(": "),
                                 retryable=True) from None

    async def _post_buffered(self, path: str, url: str, data: bytes) -> memoryview:
        """POST ``data`` to ``endpoint + path`` with the buffered reader; messages call it
        ``url``."""
        assert self._h1 is not None
        cap = self.max_response_bytes
        if self._head is None:
            self._head = self._request_head()
        base, headers = self._head
        target = urlsplit(base + path)
        line = quote(target.path, safe=_PATH_SAFE) + (
            f"?{quote(target.query, safe=_PATH_SAFE + '?')}" if target.query else "")
        request = (f"POST {line or '/'} HTTP/1.1\r\n{headers}Content-Length: {len(data)}\r\n"
                   "\r\n").encode("latin-1") + data
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._h1.post(request, cap)
        except TooLarge as e:
            size = f"is {e.length} bytes, over" if e.length is not None else "exceeds"
            raise ResponseTooLarge(f"response from {url} {size} the {cap}-byte cap",
                                   retryable=False) from None
        if resp.status >= 400:
            snippet = bytes(resp.body[:4096])
            self._pool.give(resp.body)
            raise HTTPError(resp.status, url, snippet, redact=self.redact)
        return resp.body

    async def _post_once(self, target: str, url: str, data: bytes) -> bytes:
        """POST ``data`` to ``target``; messages call it ``url``."""
        assert self._session is not None
        cap = self.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with self._session.post(target, data=data, timeout=timeout) as resp:
            length = resp.content_length
            if length is not None and length > cap:
                raise ResponseTooLarge(
                    f"response from {url} is {length} bytes, over the {cap}-byte cap",
                    retryable=False)
            if resp.status >= 400:
                raise HTTPError(resp.status, url, await resp.content.read(4096),
                                redact=self.redact)
            # Chunks as received (no intermediate joins), one copy at the end.
            chunks, size = [], 0
            async for chunk, _ in resp.content.iter_chunks():
                size += len(chunk)
                if size > cap:
                    raise ResponseTooLarge(
                        f"response from {url} exceeds the {cap}-byte cap", retryable=False)
                chunks.append(chunk)
            return b"".join(chunks)
