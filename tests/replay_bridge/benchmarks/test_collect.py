"""``bench collect``: every figure from one small run, and a clear error without the responder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from replay_bridge.benchmarks import collect as bench


def test_without_the_reference_engine_says_what_is_missing(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "reference_engine" else real(name, *a))
    with pytest.raises(RuntimeError, match="the reference_engine package is not importable"):
        bench.run(model="tiny-qwen3-moe", engine="sglang", prompts=2, prompt_len=4,
                  max_new_tokens=4, concurrency=1, repeats=1)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_small_run_reports_every_figure(engine: str, tmp_path: Path) -> None:
    r = bench.run(model="tiny-qwen3-moe", engine=engine, prompts=6, prompt_len=16,
                  max_new_tokens=8, concurrency=2, repeats=2, workdir=tmp_path,
                  floor_samples=4)
    assert r["engine"] == engine and r["tokens_per_sample"] == 24
    # every sample stored, in each round by each reader (interleaved)
    assert [(x["reader"], x["tokens"]) for x in r["rounds"]] == [
        (reader, 6 * 24) for _ in range(2) for reader in bench.READERS]
    assert set(r["by_reader"]) == set(bench.READERS) == {"buffer", "aiohttp"}
    assert r["by_reader"]["buffer"]["client_cpu_ns_per_token"] == r["client_cpu_ns_per_token"]
    for figures in r["by_reader"].values():
        assert figures["client_cpu_ns_per_token"] > 0 and figures["receive_ns_per_token"] > 0
    assert set(r["stages_ns_per_token"]) == {"receive", "decode", "check", "store"}
    assert all(v > 0 for v in r["stages_ns_per_token"].values())
    assert r["stages_sum_ns_per_token"] == pytest.approx(
        sum(r["stages_ns_per_token"].values()), abs=0.5)
    for key in ("client_cpu_ns_per_token", "floor_b64decode_ns_per_token",
                "raw_socket_recv_ns_per_token", "routing_b64_bytes_per_token"):
        assert r[key] > 0, key
    assert r["ratio_client_vs_floor"] == pytest.approx(
        r["client_cpu_ns_per_token"] / r["floor_b64decode_ns_per_token"], rel=0.05)
    assert list(tmp_path.iterdir()) == []  # the temporary shards are gone
