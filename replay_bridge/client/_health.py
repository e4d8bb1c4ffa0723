"""Waiting for an engine to come up: a free loopback port to start it on, and a poll of its
health path until it answers 200 (or its process exits, or time runs out).

Standard library only (blocking ``urllib``): callers are launchers, tests and benchmarks that
start an engine process before any event loop runs.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
import urllib.request

from ._redact import redact

__all__ = ["NotHealthyError", "free_port", "wait_healthy"]


class NotHealthyError(RuntimeError):
    """The engine at ``url`` did not answer 200 in time, or its process exited first
    (``returncode`` is then the exit code, else ``None``). ``url`` and the message carry no
    credentials of the URL."""

    def __init__(self, message: str, *, url: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.returncode = returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str,
    process: subprocess.Popen | None = None,
    *,
    timeout: float = 120.0,
    interval: float = 0.1,
    path: str = "/health",
) -> None:
    """Poll ``url + path`` until it answers 200, every ``interval`` seconds.

    Raises :class:`NotHealthyError` when ``process`` (the engine, if this caller started it)
    exits first, naming its command and exit code, or after ``timeout`` seconds.
    """
    target = url.rstrip("/") + path
    shown = redact(target)  # messages never carry a user:password@ of the URL
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            args = process.args if isinstance(process.args, (str, bytes)) else \
                " ".join(map(str, list(process.args)[:4]))
            raise NotHealthyError(f"{redact(str(args))} exited with code "
                                  f"{process.returncode} before {shown} answered", url=redact(url),
                                  returncode=process.returncode)
        try:
            with urllib.request.urlopen(target, timeout=2) as r:  # noqa: S310 - loopback/user URL
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not up yet (URLError is an OSError)
            pass
        if time.monotonic() > deadline:
            raise NotHealthyError(f"{shown} not healthy within {timeout:g} s", url=redact(url))
        time.sleep(interval)
