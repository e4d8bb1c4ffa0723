"""A small HTTP/1.1 client for the transport's hot path: POST a body, read the answer straight
into a reused buffer.

The kernel copies each answer into a ``bytearray`` taken from a :class:`BufferPool`
(``asyncio.BufferedProtocol``: ``recv_into``, no intermediate ``bytes``), so a warm buffer costs
no page faults and no copy beyond the kernel's. The answer's body comes back as a
``memoryview`` of that buffer; :meth:`BufferPool.give` takes the buffer back once nothing views
it any more (a buffer still viewed, by a ``memoryview`` or a NumPy array, is never reused).

Scope: ``Content-Length``, ``chunked`` and read-until-close bodies, keep-alive connections (one
request at a time each), ``http`` and ``https``; no proxies, redirects or content codings (it
asks for ``identity`` and refuses anything else).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

__all__ = ["BufferPool", "H1Client", "H1Error", "H1Response", "TooLarge", "give_back"]

MAX_HEAD = 64 * 1024
"""The most bytes a status line and headers may take."""

FIRST_BUFFER = 16 * 1024
"""A new buffer's size: headers and a small answer; it grows to the answer's length once
known, so memory follows the answers in flight."""


class H1Error(ConnectionError):
    """The answer could not be read: a broken connection or an answer that is not HTTP/1.1."""


class TooLarge(Exception):
    """The answer's body is over the cap (``length``: its declared size, or ``None``)."""

    def __init__(self, length: int | None) -> None:
        super().__init__(length)
        self.length = length


class _Buffer(bytearray):
    """A receive buffer made by a :class:`BufferPool`: only these go back to one, each to its
    own (never a ``bytearray`` that someone else may still write to)."""

    __slots__ = ("pool",)

    def __init__(self, size: int, pool: BufferPool) -> None:
        super().__init__(size)
        self.pool = pool


def give_back(body: object) -> bool:
    """Hand ``body`` (an answer's ``memoryview`` from :class:`H1Client`) back to the pool its
    buffer came from; ``False``, and nothing done, for anything else or a buffer still
    viewed."""
    owner = body.obj if isinstance(body, memoryview) else body
    return isinstance(owner, _Buffer) and owner.pool.give(body)


class BufferPool:
    """Receive buffers kept warm between answers: at most ``keep`` buffers and ``keep_bytes``
    bytes are held while idle. Safe to share between threads (a decoding thread gives back
    what the event loop took)."""

    def __init__(self, keep: int = 64, keep_bytes: int = 512 << 20) -> None:
        self.keep, self.keep_bytes = keep, keep_bytes
        self._free: list[bytearray] = []
        self._held = 0
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        """The largest idle buffer, or a new one."""
        with self._lock:
            if self._free:
                buf = self._free.pop()
                self._held -= len(buf)
                return buf
        return self.new(FIRST_BUFFER)

    def new(self, size: int) -> bytearray:
        """A new buffer of ``size`` bytes that :meth:`give` takes back."""
        return _Buffer(size, self)

    def give(self, buf: bytearray | memoryview | Any) -> bool:
        """Take ``buf`` (a buffer from :meth:`take` or :meth:`new`, or a ``memoryview`` of one,
        which is released) back for reuse; ``False`` when it is another pool's or anyone
        else's, or still viewed elsewhere, and so is left alone."""
        owner = buf.obj if isinstance(buf, memoryview) else buf
        if not isinstance(owner, _Buffer) or owner.pool is not self or not owner:
            return False
        if isinstance(buf, memoryview):
            buf.release()
        buf = owner
        try:  # a bytearray with live exports (views, arrays) cannot be resized
            buf.append(buf.pop())
        except BufferError:
            return False
        with self._lock:
            if (len(self._free) < self.keep and self._held + len(buf) <= self.keep_bytes
                    and all(b is not buf for b in self._free)):
                self._free.append(buf)
                self._free.sort(key=len)
                self._held += len(buf)
        return True


class H1Response:
    """A complete answer: status, headers (lower-case names) and the body, a view of a pooled
    buffer."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: memoryview) -> None:
        self.status, self.headers, self.body = status, headers, body


class _Conn(asyncio.BufferedProtocol):
    """One connection; reads one answer at a time into ``buf``."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.buf: bytearray | None = None
        self._junk = bytearray(4096)
        self._waiter: asyncio.Future[H1Response] | None = None
        self._drain: asyncio.Future[None] | None = None
        self.cap = 0

    # ---- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(H1Error("connection lost while sending"))
        self._fail(H1Error(f"the connection closed before the answer ended"
                           f"{f': {exc}' if exc else ''}"))

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.buf
        if buf is None:  # bytes nobody asked for: the connection is not reused
            self.reusable = False
            return memoryview(self._junk)
        if self.n == len(buf):
            self._grow(2 * len(buf))
        return memoryview(self.buf)[self.n:]  # type: ignore[index]

    def buffer_updated(self, nbytes: int) -> None:
        if self.buf is None:
            return
        self.n += nbytes
        try:
            self._parse()
        except Exception as e:  # noqa: BLE001 - the request fails, the loop goes on
            self.reusable = False
            self._fail(e)

    def eof_received(self) -> bool:
        self.reusable = False
        if self.buf is not None and self.mode == "close" and self.head_end >= 0:
            self._done(self.n)
        else:
            self._fail(H1Error("the server closed the connection before the answer ended"))
        return False

    # ---- one exchange --------------------------------------------------------------------

    async def exchange(self, request: bytes, cap: int) -> H1Response:
        """Send ``request`` (a whole HTTP/1.1 request) and read the answer."""
        assert self.transport is not None and self.buf is None
        loop = asyncio.get_running_loop()
        self.buf, self.n, self.cap = self.pool.take(), 0, cap
        self.head_end, self.mode, self.status, self.headers = -1, "", 0, {}
        self._scan = 0
        self._waiter = waiter = loop.create_future()
        try:
            self.transport.write(request)
            if self._drain is not None and not self._drain.done():
                await self._drain
            return await waiter
        finally:
            self._waiter = None
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved, also when sending failed first
            if self.buf is not None:  # failed or cancelled: the buffer goes back unviewed
                self.pool.give(self.buf)
                self.buf = None
                self.reusable = False

    def _fail(self, e: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(e)

    def _done(self, end: int) -> None:
        buf, self.buf = self.buf, None
        assert buf is not None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(H1Response(self.status, self.headers,
                                               memoryview(buf)[self.body_start:end]))

    def _grow(self, size: int) -> None:
        """A larger buffer (``size`` and an eighth more, so that the next answer, a little
        longer, still fits) holding what was read so far (views may pin the old one)."""
        old = self.buf
        assert old is not None
        new = self.pool.new(max(size + (size >> 3), len(old)))
        new[:self.n] = memoryview(old)[:self.n]
        self.buf = new

    def _parse(self) -> None:
        buf = self.buf
        assert buf is not None
        while self.head_end < 0:
            end = buf.find(b"\r\n\r\n", max(self._scan - 3, 0), self.n)
            if end < 0:
                if self.n > MAX_HEAD:
                    raise H1Error(f"the answer's headers exceed {MAX_HEAD} bytes")
                self._scan = self.n
                return
            if not self._head(bytes(buf[:end])):  # 1xx: drop it, read the next head
                rest = self.n - end - 4
                buf[:rest] = buf[end + 4:self.n]
                self.n, self._scan = rest, 0
                continue
            self.head_end = self.body_start = end + 4
            self._pos = self._out = self.body_start
            self._left = -1
        if self.mode == "length":
            if self.n >= self.need:
                if self.n > self.need:
                    self.reusable = False
                self._done(self.need)
        elif self.mode == "chunked":
            self._chunks()
        elif self.n - self.body_start > self.cap:
            raise TooLarge(None)

    def _head(self, head: bytes) -> bool:
        """Read the status line and headers; ``False`` for an interim (1xx) answer."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise H1Error(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise H1Error(f"malformed header line {line[:80]!r}")
            key = name.strip().lower().decode("latin-1")
            v = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {v}" if key in headers else v
        self.status, self.headers = status, headers
        connection = headers.get("connection", "").lower()
        if "close" in connection or (parts[0] == b"HTTP/1.0" and "keep-alive" not in connection):
            self.reusable = False
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise H1Error(f"the answer is {coding}-encoded; identity was asked for")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.mode = "chunked"
        elif status in (204, 304):
            self.mode, self.need = "length", len(head) + 4
        elif "content-length" in headers:
            text = headers["content-length"].strip()
            if not text.isdigit():
                raise H1Error(f"bad Content-Length {text[:40]!r}")
            length = int(text)
            if length > self.cap:
                raise TooLarge(length)
            self.mode, self.need = "length", len(head) + 4 + length
            if len(self.buf) < self.need:  # type: ignore[arg-type]
                self._grow(self.need)
        else:
            self.mode, self.reusable = "close", False
        return True

    def _chunks(self) -> None:
        """Decode the chunked body read so far in place: chunk data moves down over the size
        lines; ``_out`` is where the body ends, ``_pos`` where reading resumes."""
        buf = self.buf
        assert buf is not None
        while True:
            if self._left < 0:  # at a size line
                eol = buf.find(b"\r\n", self._pos, self.n)
                if eol < 0:
                    return
                size_text = bytes(buf[self._pos:eol]).split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise H1Error(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:  # trailers (if any) end at an empty line
                    if buf.find(b"\r\n\r\n", eol, self.n) >= 0:
                        self._done(self._out)
                    return
                if self._out - self.body_start + size > self.cap:
                    raise TooLarge(None)
                self._pos, self._left = eol + 2, size
            k = min(self._left, self.n - self._pos)
            if k > 0 and self._out != self._pos:
                buf[self._out:self._out + k] = buf[self._pos:self._pos + k]
            self._out += k
            self._pos += k
            self._left -= k
            if self._left:
                return
            if self.n - self._pos < 2:  # the CRLF after the data
                self._left = 0
                return
            self._pos += 2
            self._left = -1


class H1Client:
    """Keep-alive connections to one ``host:port`` (``https`` when ``tls``), each used by one
    request at a time, at most ``limit`` at once (0: no limit); buffers from ``pool``."""

    def __init__(self, host: str, port: int, *, tls: bool = False,
                 pool: BufferPool | None = None, limit: int = 0) -> None:
        self.host, self.port = host, port
        self.pool = pool or BufferPool()
        self._ssl = ssl.create_default_context() if tls else None
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None

    async def post(self, request: bytes, cap: int) -> H1Response:
        """Send ``request`` on an idle connection (or a new one) and read the answer; raises
        :class:`H1Error` / ``OSError`` on a broken exchange, :class:`TooLarge` over ``cap``."""
        if self._slots is None:
            return await self._post(request, cap)
        async with self._slots:
            return await self._post(request, cap)

    async def _post(self, request: bytes, cap: int) -> H1Response:
        conn = None
        while self._idle:
            c = self._idle.pop()
            if c.reusable and not c.closed and c.transport is not None \
                    and not c.transport.is_closing():
                conn = c
                break
            self._drop(c)
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                lambda: _Conn(self.pool), self.host, self.port, ssl=self._ssl,
                server_hostname=self.host if self._ssl else None)
            self._open.add(conn)
        ok = False
        try:
            resp = await conn.exchange(request, cap)
            ok = True
            return resp
        finally:
            if ok and conn.reusable and not conn.closed and conn in self._open:
                self._idle.append(conn)
            else:
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._open.discard(conn)
        if conn.transport is not None:
            conn.transport.abort()

    def close(self) -> None:
        """Close every connection; an exchange still in flight fails (:class:`H1Error`)."""
        self._idle.clear()
        for conn in list(self._open):
            self._open.discard(conn)
            if conn.transport is not None:
                conn.transport.close()
