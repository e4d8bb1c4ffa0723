"""A collection survives what production throws at it: the collector SIGKILLed and resumed,
the engine killed and restarted mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from reference_engine.loopback import synthetic_routing
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import Manifest, ShardError, ShardReader

from tests.support.processes import child_env, cli, free_port, stop, wait_healthy

TINY = RoutingGeometry.from_preset("tiny-qwen3-moe")


def write_prompts(path: Path, n: int, first: int = 1) -> Path:
    path.write_text("".join(
        json.dumps({"prompt_id": f"p{i:04d}", "input_ids": [first + i % 7, 2, 3, i % 400]}) + "\n"
        for i in range(n)))
    return path


def collect_args(url: str, prompts: Path, out: Path, max_new_tokens: int,
                 samples_per_shard: int) -> list[str]:
    """``collect --json`` of ``prompts`` from the SGLang light responder at ``url``."""
    return ["collect", "--endpoint", url, "--engine", "sglang", "--prompts", str(prompts),
            "--model", "tiny-qwen3-moe", "--out", str(out), "--max-new-tokens",
            str(max_new_tokens), "--concurrency", "8", "--samples-per-shard",
            str(samples_per_shard), "--json"]


def stored_count(out: Path) -> int:
    """Samples the dataset's published manifests hold (0 while none is published)."""
    try:
        return Manifest.read(out).outcomes["stored"]
    except (OSError, ShardError):
        return 0


def published(out: Path) -> bool:
    """Whether a writer has published its manifest into the dataset ``out``."""
    return any((out / "_routing_replay" / "manifests").glob("*.json"))


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: "
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.01)
    raise TimeoutError("condition not reached")


def test_sigkill_then_resume_loses_nothing_and_stores_nothing_twice(responder, tmp_path: Path):
    url = responder("sglang", delay=0.03)
    n = 400
    prompts = write_prompts(tmp_path / "p.jsonl", n)
    out = tmp_path / "out"
    args = collect_args(url, prompts, out, max_new_tokens=6, samples_per_shard=16)
    proc = subprocess.Popen(cli(*args), env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stored_count(out) >= 48, 60, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    kept = stored_count(out)
    assert 48 <= kept < n, "the kill must land mid-collection"

    done = subprocess.run(cli(*args, "--resume"), env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    totals = json.loads(done.stdout)["totals"]
    assert totals["prompts_skipped"] >= kept  # what was sealed is not asked for again
    assert totals["stored"] == n - totals["prompts_skipped"]

    reader = ShardReader(out)
    ids = reader.sample_ids()
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"p{i:04d}" for i in range(n)}
    for s in reader:
        np.testing.assert_array_equal(s.routed, synthetic_routing(s.tokens, TINY))
    assert Manifest.read(out).outcomes == {"stored": n, "rejected": 0, "failed": 0}


def test_sigterm_seals_what_was_stored(responder, tmp_path: Path) -> None:
    url = responder("sglang", delay=0.03)
    n = 300
    prompts = write_prompts(tmp_path / "p.jsonl", n)
    out = tmp_path / "out"
    args = collect_args(url, prompts, out, max_new_tokens=4, samples_per_shard=1000)
    proc = subprocess.Popen(cli(*args), env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        # One shard of 1,000 samples never fills: only a graceful stop seals what is stored.
        wait_for(lambda: published(out), 60, proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 2 and "--resume" in json.loads(stdout)["error"]
    kept = stored_count(out)
    assert 0 < kept < n
    done = subprocess.run(cli(*args, "--resume"), env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["prompts_skipped"] == kept
    assert sorted(ShardReader(out).sample_ids()) == [f"p{i:04d}" for i in range(n)]


@pytest.mark.slow
def test_engine_killed_and_restarted_mid_collection(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = cli("serve", "--model", str(tiny_model), "--port", str(port), "--dtype", "float32")
    n = 40
    prompts = write_prompts(tmp_path / "p.jsonl", n, first=10)
    out = tmp_path / "out"
    engine = subprocess.Popen(serve, env=child_env(), stderr=subprocess.DEVNULL)
    collector = None
    try:
        wait_healthy(url, engine)
        collector = subprocess.Popen(
            cli("collect", "--endpoint", url, "--engine", "sglang", "--prompts", str(prompts),
                "--model", str(tiny_model), "--out", str(out), "--max-new-tokens", "24",
                "--concurrency", "2", "--samples-per-shard", "4", "--retries", "80",
                "--max-retry-delay", "0.5", "--json"),
            env=child_env(), stdout=subprocess.PIPE, text=True)
        wait_for(lambda: stored_count(out) >= 8, 120, collector)
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        killed_at = stored_count(out)
        time.sleep(1.0)  # the collector is now retrying against a dead port
        engine = subprocess.Popen(serve, env=child_env(), stderr=subprocess.DEVNULL)
        stdout, _ = collector.communicate(timeout=300)
    finally:
        if collector is not None:
            stop(collector)
        stop(engine)
    assert collector.returncode == 0, stdout
    doc = json.loads(stdout)
    assert killed_at < n
    assert doc["totals"]["stored"] == n and doc["totals"]["failed"] == 0
    assert doc["totals"]["retries"] > 0
    reader = ShardReader(out)
    assert sorted(reader.sample_ids()) == [f"p{i:04d}" for i in range(n)]
