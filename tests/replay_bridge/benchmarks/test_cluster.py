"""bench cluster: a tiny scaling run on a local Ray cluster against light responders."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="bench cluster needs the ray extra")
pytestmark = pytest.mark.ray


def test_tiny_run_collects_every_prompt_for_each_worker_count(tmp_path: Path) -> None:
    from replay_bridge.benchmarks.cluster import run

    out = run(workers=(1, 2), prompts=12, prompt_len=16, max_new_tokens=8,
              model="tiny-qwen3-moe", repeats=1, workdir=tmp_path)
    rows = {r["workers"]: r for r in out["results"]}
    assert set(rows) == {1, 2}
    assert rows[1]["speedup_over_first"] == 1.0
    for r in rows.values():  # run() raises unless every prompt was stored
        assert r["seconds"] > 0 and r["samples_per_s"] == pytest.approx(12 / r["seconds"], rel=0.01)
    assert out["machine"]["cpus"] >= 1
    assert list(tmp_path.iterdir()) == []
