"""Redaction of credentials from text the client stores or prints: error messages, log lines,
reprs, quarantine records.

Two layers. Patterns that need no knowledge of the secrets: URL userinfo
(``http://user:pass@host`` -> ``http://***@host``), ``Bearer``/``Basic`` credentials,
``Authorization``-like header values and ``api_key=``-like query parameters. Then the known
secrets (the API key, the endpoint's password) in every form an engine is likely to echo
them: as is, URL-encoded, JSON-escaped and base64 (also ``user:password`` as HTTP Basic sends
it).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

__all__ = ["MASK", "Redactor", "redact", "split_userinfo"]

MASK = "***"

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s\"'<>]*@")
_SCHEME_TOKEN = re.compile(r"\b((?i:bearer))(\s+)[A-Za-z0-9\-._~+/]{6,}=*"
                           r"|\b(Basic)(\s+)[A-Za-z0-9+/]{6,}=*")
_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|cookie|set-cookie)"
    r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)((?:[A-Za-z]+[ \t]+)?[^\s\"'\\,;}]+)")
_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|access[_-]?token|token|key|password|secret)=)[^&\s\"'#<>]+")


def _variants(secret: str) -> set[str]:
    """The forms of ``secret`` worth looking for: raw, URL-encoded, JSON-escaped, base64."""
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = enc.decode()
        forms.update((text, text.rstrip("=")))
    return {f for f in forms if f}


def _scheme_token(m: re.Match[str]) -> str:
    if m.group(1):
        return f"{m.group(1)}{m.group(2)}{MASK}"
    return f"{m.group(3)}{m.group(4)}{MASK}"


class Redactor:
    """Replace the given secrets (and every credential the patterns recognise) with ``***``.

    Calling it on text that holds none returns the text unchanged. ``repr`` names how many
    secrets it knows, never them.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        known = [s for s in secrets if s]
        forms: set[str] = set()
        for s in known:
            forms |= _variants(s)
        # Longest first, so that a secret inside another's encoding is not half-replaced.
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._secrets = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._count = len(known)

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
        text = _SCHEME_TOKEN.sub(_scheme_token, text)
        text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
        return _QUERY.sub(lambda m: m.group(1) + MASK, text)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with ``secrets`` and every recognisable credential (URL userinfo, bearer and
    basic tokens, authorization headers, key-like query parameters) replaced by ``***``."""
    return Redactor(secrets)(text)


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its userinfo, and the user and password it held (``None`` when absent).

    ``http://user:pass@host:8000/v1`` -> ``("http://host:8000/v1", "user", "pass")``; the
    user and password come back percent-decoded, as HTTP Basic sends them.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=hostport))
    return clean, unquote(user), unquote(password) if sep else None
