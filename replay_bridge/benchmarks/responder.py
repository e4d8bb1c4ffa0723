"""The light responder (``python -m reference_engine.loopback``) in a child process, for the
benchmarks that need an engine: started on a free port and waited for, then stopped.

A subprocess, not an import: the library does not depend on the reference engine, and a
benchmark that needs it says so when it is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

__all__ = ["RESPONDER", "start_responder", "stop_responder"]

RESPONDER = "reference_engine.loopback"
TIMEOUT_S = 60.0


def start_responder(bench: str, engine: str, model: str,
                    *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """The responder for ``engine`` and ``model`` (plus ``extra`` arguments) once it answers
    ``/health``; its URL. ``RuntimeError`` naming ``bench`` when it cannot be started."""
    # Imported here: a benchmark's child processes measure what they import themselves.
    from ..client import NotHealthyError, free_port, wait_healthy

    if importlib.util.find_spec(RESPONDER.partition(".")[0]) is None:
        raise RuntimeError(
            f"{bench} runs the light responder (python -m {RESPONDER}), but the "
            f"reference_engine package is not importable by {sys.executable}: install the "
            "project (pip install -e '.[client]' from the checkout) into this environment")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", RESPONDER, "--engine", engine, "--model", model,
         "--port", str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=TIMEOUT_S)
    except NotHealthyError as e:
        proc.kill()
        if e.returncode is None:
            raise RuntimeError(f"responder did not come up within {TIMEOUT_S:.0f} s") from None
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"responder exited: {err[-2000:]}") from None
    return proc, url


def stop_responder(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
