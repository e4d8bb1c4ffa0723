"""A vLLM started by the demo never outlives it: a stand-in server (a script that records its
pid and sleeps, never healthy) is started through ``--start-vllm``, then the demo is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow


def _fake_vllm(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/bash\necho $$ > {tmp_path}/server.pid\n{body}\n")
    script.chmod(0o755)
    return script


def _demo(tmp_path: Path, script: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from replay_bridge.cli import main; main()", "demo", "--json",
           "--engine", "vllm", "--start-vllm", "--out", str(tmp_path / "out"),
           "--set", f"engine.vllm_python={script}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{path} never appeared")


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143),
                                       (signal.SIGINT, 130)])
def test_a_killed_demo_takes_its_server_down(tmp_path, sig, code):
    proc = _demo(tmp_path, _fake_vllm(tmp_path, "exec sleep 600"))
    try:
        pid = _wait_for(tmp_path / "server.pid")
        time.sleep(0.5)
        proc.send_signal(sig)
        assert proc.wait(30) == code
        assert _gone(pid), f"server {pid} outlived the demo"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_that_dies_while_starting_is_a_usage_error(tmp_path):
    proc = _demo(tmp_path, _fake_vllm(tmp_path, "echo 'no such model' >&2; exit 3"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    err = orjson.loads(out)["error"]
    assert "exited with code 3" in err and "no such model" in err
