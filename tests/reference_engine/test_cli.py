"""The ``serve``, ``route`` and ``make-tiny-model`` commands."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from tests.support.processes import ROOT, cli

from .conftest import post, routing


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_make_tiny_model_is_deterministic_and_matches_the_preset(tmp_path, tiny_model_dir):
    res = CliRunner().invoke(command_line(), ["make-tiny-model", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["geometry"]["num_layers"] == 4 and out["geometry"]["top_k"] == 2
    assert _digest(tmp_path / "m") == _digest(tiny_model_dir)
    RoutingGeometry.from_model_dir(tmp_path / "m").require_same(
        RoutingGeometry.from_preset("tiny-qwen3-moe"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["head_dim"] == 32 and config["num_experts"] == 8
    other = CliRunner().invoke(command_line(), ["make-tiny-model", str(tmp_path / "s1"), "--seed", "1"])
    assert other.exit_code == 0
    assert (_digest(tmp_path / "s1")["model.safetensors"]
            != _digest(tiny_model_dir)["model.safetensors"])


def test_tokenizer_loads_offline(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    ids = tok("Rollout routing replay: 12 plus 30 is 42.")["input_ids"]
    assert 0 < len(ids) < 40 and max(ids) < 512
    assert tok.decode(ids) == "Rollout routing replay: 12 plus 30 is 42."
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def _start(args: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(cli(*args, "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"{args[0]} did not start: {proc.stderr.read().decode()[-2000:]}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.mark.slow
def test_serve_and_route_processes(tiny_model_dir, pd, runner):
    procs = []
    try:
        worker, info = _start(["serve", "--model", str(tiny_model_dir), "--port", "0",
                               "--dtype", "float32", "--weight-version", "v7"])
        procs.append(worker)
        assert info["role"] == "unified" and info["geometry"]["num_experts"] == 8
        body = {"input_ids": [9, 8, 7, 6], "return_routed_experts": True,
                "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
        status, r = post(info["url"] + "/generate", body)
        assert status == 200 and r["meta_info"]["weight_version"] == "v7"
        np.testing.assert_array_equal(routing(r["meta_info"]["routed_experts"]),
                                      runner.forward_routing([9, 8, 7, 6] + r["output_ids"])[:-1])
        router, rinfo = _start(["route", "--prefill", pd.prefill, "--decode", pd.decode,
                                "--port", "0", "--fault", "no-merge"])
        procs.append(router)
        r2 = post(rinfo["url"] + "/generate", body)[1]
        assert r2["output_ids"] == r["output_ids"]
        assert not routing(r2["meta_info"]["routed_experts"])[:4].any()
    finally:
        codes = [_stop(p) for p in procs]
    assert codes == [0] * len(procs)


@pytest.mark.parametrize("args, needle", [
    (["serve", "--model", "/nonexistent", "--port", "0"], "no config.json"),
    (["serve", "--model", ".", "--role", "both"], "--role"),
    (["serve", "--model", ".", "--fault", "no-merge"], "router fault"),
    (["route", "--prefill", "localhost:1", "--decode", "http://x"], "http(s) URL"),
    (["route", "--prefill", "http://a", "--decode", "http://b", "--fault", "nope"], "--fault"),
])
def test_usage_errors_exit_2(args, needle):
    res = CliRunner().invoke(command_line(), [*args, "--json"])
    assert res.exit_code == 2
    assert needle in json.loads(res.stdout)["error"]
