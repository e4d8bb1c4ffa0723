"""Child processes in tests: clean stops, the light responder, SGLang's mini load balancer (free
ports and health waits: ``replay_bridge.client.free_port`` / ``wait_healthy``, re-exported here)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replay_bridge.client import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
SGLANG_ROUTER_PYTHON = (os.environ.get("SGLANG_ROUTER_PYTHON")
                        or str(ROOT / ".venv-sglang-router/bin/python"))
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

# pytestmark of the tests that run a real vLLM / SGLang's own router.
REQUIRES_VLLM = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=".venv-vllm is absent: run scripts/vllm_env.sh (make test does)"),
]
REQUIRES_SGLANG_ROUTER = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(SGLANG_ROUTER_PYTHON).exists(),
                       reason=f"sglang-router not installed ({SGLANG_ROUTER_PYTHON}); "
                              "run scripts/sglang_router_env.sh"),
]


def cli(*args: str) -> list[str]:
    """argv for the replay-bridge CLI in a child process."""
    return [sys.executable, "-c", "from replay_bridge.cli import main; main()", *args]


def child_env() -> dict[str, str]:
    """This environment, with the checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit within 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def loopback_responder(engine: str = "sglang", model: str = "tiny-qwen3-moe",
                       delay: float = 0.0) -> Iterator[str]:
    """The light responder (``reference_engine.loopback``) in its own process; yields its
    URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference_engine.loopback", "--engine", engine,
         "--model", model, "--port", str(port), "--delay", str(delay)], env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def sglang_mini_lb(prefill: str, decode: str) -> Iterator[str]:
    """SGLang's own PD router (``sglang-router --mini-lb``) in front of a prefill/decode pair;
    yields its URL. Needs ``.venv-sglang-router`` (``scripts/sglang_router_env.sh``)."""
    port = free_port()
    proc = subprocess.Popen(
        [SGLANG_ROUTER_PYTHON, "-m", "sglang_router.launch_router", "--pd-disaggregation",
         "--mini-lb", "--prefill", prefill, "8998", "--decode", decode,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=60)
        yield url
    finally:
        stop(proc)
