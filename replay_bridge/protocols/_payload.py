"""Find base64 payloads in raw JSON bytes, so that they never become Python ``str``.

A response body is split into a *skeleton* (the JSON with every ``"routed_experts": "<b64>"``
value replaced by a short placeholder ``"#<i>"``) and the list of payloads as ``memoryview``
slices of the body. The skeleton parses in microseconds; each payload is base64-decoded straight
from the body's bytes. Decoders look a field up in the parsed skeleton and decode it with
:meth:`Payloads.decode` (:meth:`Payloads.resolve` gives the raw text): a placeholder maps back to
its slice, anything else (a field the scan did not split, e.g. in an unusual encoding) is taken
as it is, so the split is an optimisation that can never change a result.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson
import pybase64

_WS = b" \t\r\n"


@dataclass
class Payloads:
    """The payloads split out of one body; :meth:`decode` base64-decodes a parsed field value."""

    views: list[memoryview] = field(default_factory=list)

    def resolve(self, value: Any) -> bytes | memoryview | str | None:
        """The raw base64 text for a field value: a payload slice for a placeholder."""
        if isinstance(value, str) and value.startswith("#") and value[1:].isdigit():
            i = int(value[1:])
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


def split(
    body: bytes | bytearray | memoryview | Any, start: int = 0, end: int | None = None,
    key: bytes = b'"routed_experts"',
) -> tuple[bytes, Payloads]:
    """Split ``body[start:end]`` into a skeleton and the string payloads of every ``key``.

    ``body`` is ``bytes`` or anything with ``bytes``-like ``find`` and indexing (an ``mmap``):
    payloads stay views of it.
    """
    buf = bytes(body) if isinstance(body, (bytearray, memoryview)) else body
    mv = memoryview(buf)
    n = len(buf) if end is None else end
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
        parts.append(b"#%d" % len(payloads.views))
        payloads.views.append(mv[first:close])
        last = pos = close
    if not payloads.views:
        return bytes(mv[start:n]) if (start or n != len(buf) or not isinstance(buf, bytes)) else buf, payloads
    parts.append(mv[last:n])
    return b"".join(parts), payloads


def loads(body: bytes | bytearray | memoryview | str) -> tuple[Any, Payloads]:
    """Parse a JSON body with its routing payloads split out (``ValueError`` if not JSON)."""
    if isinstance(body, str):
        body = body.encode()
    skeleton, payloads = split(body)
    return orjson.loads(skeleton), payloads
