"""Find base64 payloads in raw JSON bytes, so that they never become Python ``str``.

A response body is split into a *skeleton* (the JSON with every ``"routed_experts": "<b64>"``
value replaced by a short placeholder) and the list of payloads as ``memoryview`` slices of the
body. The skeleton parses in microseconds; each payload is base64-decoded straight from the
body's bytes. Decoders look a field up in the parsed skeleton and decode it with
:meth:`Payloads.decode` (:meth:`Payloads.resolve` gives the raw text): a placeholder maps back to
its slice, anything else (a field the scan did not split, e.g. under a key spelled with a JSON
escape) is taken as it is.

The split is an optimisation that never changes a result. A placeholder is
``"@<nonce>:<i>"`` with a nonce no body can know: a random key drawn once per process (it never
leaves the process) followed by the body's own number, so no text in a body can name another
value's payload; and a skeleton that does not parse (a value holding
an escaped quote ends the scan's slice early) falls back to parsing the body as it is.
"""

from __future__ import annotations

import binascii
import itertools
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pybase64

_WS = b" \t\r\n"


_KEY = os.urandom(12).hex()
_BODIES = itertools.count()


def _nonce() -> str:
    """Unique to each body and unknowable to its sender: the process's random key and the
    body's number (no system call per body)."""
    return f"{_KEY}{next(_BODIES):x}"


@dataclass
class Payloads:
    """The payloads split out of one body; :meth:`decode` base64-decodes a parsed field value.

    ``prefix`` (``"@<nonce>:"``) starts every placeholder of this body; it is random per body,
    so a value the body spells itself never resolves to a payload.
    """

    views: list[memoryview] = field(default_factory=list)
    prefix: str = field(default_factory=lambda: f"@{_nonce()}:")

    def placeholder(self, i: int) -> bytes:
        """The skeleton's text standing for payload ``i``."""
        return f"{self.prefix}{i}".encode()

    def resolve(self, value: Any) -> bytes | memoryview | str | None:
        """The raw base64 text for a field value: a payload slice for a placeholder."""
        if isinstance(value, str) and value.startswith(self.prefix):
            index = value[len(self.prefix):]
            if index.isdigit() and index.isascii():
                i = int(index)
                if i < len(self.views):
                    return self.views[i]
        return value

    def decode(self, value: Any) -> bytes:
        """Base64-decode a field value (placeholder or plain string).

        Raises ``ValueError`` with the reason when it is not valid base64.
        """
        raw = self.resolve(value)
        if not isinstance(raw, (bytes, memoryview, str)):
            raise ValueError(f"expected a base64 string, got {type(raw).__name__}")
        try:
            return pybase64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            pass
        # JSON may escape "/" as "\/"; anything else is not base64.
        text = bytes(raw) if not isinstance(raw, str) else raw.encode()
        try:
            return pybase64.b64decode(text.replace(b"\\/", b"/"), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid base64 ({len(text)} chars): {e}") from None


def _base(body: Any, start: int, end: int | None) -> tuple[Any, int, int]:
    """``(buf, start, end)`` with ``buf`` searchable (``find``): a byte ``memoryview`` of a
    ``bytes``, ``bytearray`` or ``mmap`` becomes that object and the view's place in it (no
    copy); any other view is copied once."""
    if isinstance(body, memoryview):
        owner = body.obj
        if (isinstance(owner, (bytes, bytearray, mmap.mmap)) and body.ndim == 1
                and body.c_contiguous and body.itemsize == 1 and len(body)):
            off = (np.frombuffer(body, np.uint8).__array_interface__["data"][0]
                   - np.frombuffer(owner, np.uint8).__array_interface__["data"][0])
            n = len(body) if end is None else end
            return owner, off + start, off + n
        body = bytes(body)
    return body, start, len(body) if end is None else end


def split(
    body: bytes | bytearray | memoryview | Any, start: int = 0, end: int | None = None,
    key: bytes = b'"routed_experts"',
) -> tuple[bytes, Payloads]:
    """Split ``body[start:end]`` into a skeleton and the string payloads of every ``key``.

    ``body`` is ``bytes``, ``bytearray``, a ``memoryview`` of one, or anything with
    ``bytes``-like ``find`` and indexing (an ``mmap``): payloads stay views of it, never
    copies.
    """
    buf, start, n = _base(body, start, end)
    mv = memoryview(buf)
    parts: list[bytes | memoryview] = []
    payloads = Payloads()
    pos = last = start
    while True:
        i = buf.find(key, pos, n)
        if i < 0:
            break
        j = i + len(key)
        while j < n and buf[j] in _WS:
            j += 1
        if j >= n or buf[j] != 0x3A:  # ':'
            pos = j
            continue
        j += 1
        while j < n and buf[j] in _WS:
            j += 1
        if j >= n or buf[j] != 0x22:  # '"': null / list forms are left to the parser
            pos = j
            continue
        first = j + 1
        close = buf.find(b'"', first, n)
        if close < 0:
            break
        parts.append(mv[last:first])
        parts.append(payloads.placeholder(len(payloads.views)))
        payloads.views.append(mv[first:close])
        last = pos = close
    if not payloads.views:
        whole = not start and n == len(buf) and isinstance(buf, bytes)
        return buf if whole else bytes(mv[start:n]), payloads
    parts.append(mv[last:n])
    return b"".join(parts), payloads


def loads(
    body: bytes | bytearray | memoryview | str | Any, start: int = 0, end: int | None = None
) -> tuple[Any, Payloads]:
    """Parse the JSON in ``body[start:end]`` with its routing payloads split out
    (``ValueError`` if it is not JSON).

    When the skeleton does not parse, the text is parsed as it is (no payload split out), so
    the result is always what a plain JSON parser makes of it.
    """
    if isinstance(body, str):
        body = body.encode()
    buf, start, n = _base(body, start, end)
    skeleton, payloads = split(buf, start, n)
    try:
        return orjson.loads(skeleton), payloads
    except orjson.JSONDecodeError:
        if not payloads.views:
            raise
    return orjson.loads(memoryview(buf)[start:n]), Payloads()
