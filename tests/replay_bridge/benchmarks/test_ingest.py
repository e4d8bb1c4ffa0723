"""``bench ingest``: a tiny run reports every figure, quiet and with one core busy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replay_bridge.benchmarks import ingest as bench


def test_tiny_run_reports_quiet_and_busy_figures_and_stops_its_spinner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spinners: list[int] = []
    popen = bench.subprocess.Popen

    def recording_popen(*args, **kwargs):
        p = popen(*args, **kwargs)
        spinners.append(p.pid)
        return p

    monkeypatch.setattr(bench.subprocess, "Popen", recording_popen)
    out = bench.run(tokens=4096, prompt_len=64, completion_len=192, repeats=2, peer=False,
                    workdir=tmp_path)
    assert out["samples"] == 16 and out["tokens"] == 4096
    assert out["ingest_s"] > 0 and out["ingest_cpu_s"] > 0 and out["floor_b64decode_s"] > 0
    assert out["ingest_over_floor"] == pytest.approx(out["ingest_s"] / out["floor_b64decode_s"],
                                                  rel=0.05)
    busy = out["one_core_busy"]
    assert len(busy["runs_s"]["ingest"]) == 2 and busy["ingest_over_floor"] > 0
    assert set(out["targets"]) >= {"ingest_over_floor<=1.0",
                                   "one_core_busy_ingest_over_floor<=1.3"}
    assert out["shard_over_int32"] < 0.3
    pool = out["workers"]  # ingest(workers=2), quiet and busy, beside the one-process figures
    assert pool["workers"] == 2 and len(pool["runs_s"]["ingest"]) == 2
    assert pool["ingest_over_floor"] > 0 and pool["one_core_busy"]["ingest_over_floor"] > 0
    best = min(out["ingest_over_floor"], pool["ingest_over_floor"])
    assert out["targets"]["ingest_over_floor<=1.0"] == (best <= 1.0)
    assert len(spinners) == 2  # one spinner per busy round, each gone when its round ended
    for pid in spinners:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert list(tmp_path.iterdir()) == []  # the traffic and shards are removed


def test_quiet_only_run_has_no_busy_figures(tmp_path: Path) -> None:
    out = bench.run(tokens=2048, prompt_len=64, completion_len=192, repeats=1, peer=False,
                    busy=False, workers=1, workdir=tmp_path)
    assert "one_core_busy" not in out and "workers" not in out
    assert out["targets"]["one_core_busy_ingest_over_floor<=1.3"] is None
