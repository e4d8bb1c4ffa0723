"""free_port and wait_healthy: up when /health answers 200, a clear error when the process
exits first or time runs out."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from replay_bridge.client import NotHealthyError, free_port, wait_healthy


@contextmanager
def health_server(status: int, after: float = 0.0) -> Iterator[str]:
    """``/health`` answers ``status`` once ``after`` seconds have passed (503 before)."""
    start = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            code = status if time.monotonic() - start >= after else 503
            self.send_response(code if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_waits_until_healthy() -> None:
    with health_server(200, after=0.3) as url:
        t = time.monotonic()
        wait_healthy(url + "/", timeout=10, interval=0.05)
        assert time.monotonic() - t >= 0.25  # it polled through the 503s


def test_unhealthy_until_the_timeout() -> None:
    with health_server(500) as url, pytest.raises(NotHealthyError) as ei:
        wait_healthy(url, timeout=0.3, interval=0.05)
    assert ei.value.returncode is None and ei.value.url == url
    assert f"{url}/health not healthy within 0.3 s" in str(ei.value)


def test_a_process_that_exits_first_is_named() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(NotHealthyError) as ei:
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, timeout=30)
    assert ei.value.returncode == 3
    assert "exited with code 3" in str(ei.value) and "raise SystemExit(3)" in str(ei.value)
