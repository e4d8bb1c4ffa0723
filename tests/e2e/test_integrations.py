"""The integration examples of docs/integrations.md, run as a user runs them: each builds the
routing tensors one RL framework holds (verl, slime, NeMo-RL), feeds them to the bridge's
adapter and replays them in a tiny megatron-core model on the CPU.

Agreement is counted by the examples from the framework's own tensor and the experts each
router actually used, so a misaligned adapter or layout fails here. Every run trains twice on
the same weights: replay off must disagree with the rollout (else 100% would prove nothing),
replay on must agree exactly; NeMo-RL's ``-1`` rows must route with the router's own top-k and
be counted apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import child_env

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "integrations"

RUNS = {  # name: (example, arguments)
    "verl": ("verl", ()),
    "verl-bshd-pd": ("verl", ("--packing", "bshd", "--pd", "merged")),
    "verl-decode-only": ("verl", ("--pd", "decode-only")),
    "slime": ("slime", ()),
    "nemo-rl": ("nemo_rl", ()),
}


def run_example(name: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}_example.py"), "--json", "--threads", "1",
         *args],
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Every run of the examples, two at a time (each is mostly torch and megatron-core
    imports on one core)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(run_example, name, *args) for k, (name, args) in RUNS.items()}
        return {k: f.result() for k, f in futures.items()}


def assert_replayed_exactly(result: dict[str, Any]) -> None:
    assert result["accepted"] == result["samples"] > 0
    on, off = result["replay_on"], result["replay_off"]
    assert on["tokens"] == off["tokens"] > 0
    assert on["exact"] == 1.0 and on["overlap"] == 1.0
    assert off["exact"] < 1.0  # the rollout's routing is not the trainer's own
    # The bridge's own measure (router's own top-k vs replayed) sees the same mismatch.
    assert result["bridge_metrics"]["routing_replay/exact"] < 1.0


@pytest.mark.parametrize("run", ["verl", "verl-bshd-pd"])
def test_verl_padded_batch_replays_exactly(results: dict, run: str) -> None:
    result = results[run]
    assert result["packing"] == ("thd" if run == "verl" else "bshd")
    assert_replayed_exactly(result)
    assert result["replay_on"]["prompt"]["exact"] == 1.0
    assert result["replay_on"]["completion"]["exact"] == 1.0


def test_verl_pd_needs_the_prefill_rows(results: dict) -> None:
    assert results["verl-bshd-pd"]["pd"] == "merged"  # replayed exactly, above
    # verl today keeps the decode worker's answer only: its prompt rows are valid ids of
    # another request, so every check passes and the prompt is replayed wrong.
    decode_only = results["verl-decode-only"]
    assert decode_only["accepted"] == decode_only["samples"]
    assert decode_only["replay_on"]["completion"]["exact"] == 1.0
    assert decode_only["replay_on"]["prompt"]["exact"] < 1.0


def test_slime_sample_arrays_replay_exactly(results: dict) -> None:
    assert_replayed_exactly(results["slime"])


def test_nemo_rl_marked_rows_route_natively(results: dict) -> None:
    result = results["nemo-rl"]
    assert_replayed_exactly(result)
    native = result["replay_on"]["native"]
    assert result["native_rows"] == native["tokens"] > 0
    assert native["exact"] == 1.0  # the router's own top-k, under replay of the other rows
    assert result["bridge_metrics"]["routing_replay/native/tokens"] == native["blocks"]
