"""bench dataset: a small run on a local directory and on the S3 loopback server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from replay_bridge.benchmarks.dataset import run
from tests.support.processes import child_env, cli


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, env=child_env(),
                          timeout=300)


def test_small_run_reports_open_plan_and_rank_read_per_backend(tmp_path: Path) -> None:
    pytest.importorskip("moto", reason="the S3 side of bench dataset needs moto[server]")
    out = run(sizes=(40, 160), tokens=6, ranks=8, preset="tiny-qwen3-moe", repeats=1,
              workdir=tmp_path)
    rows = {(r["backend"], r["samples"]): r for r in out["results"]}
    assert set(rows) == {("local", 40), ("local", 160), ("s3", 40), ("s3", 160)}
    assert rows["local", 160]["rank_samples"] == 20 and rows["s3", 40]["rank_samples"] == 5
    for r in rows.values():
        assert r["open_ms"] > 0 and r["rank_read_ms"] > 0 and r["rank_samples_per_s"] > 0
    assert set(out["meets_target"]) == {"local", "s3"}
    assert out["ratios"]["s3"]["open_largest_over_smallest"] > 0
    assert list(tmp_path.iterdir()) == []  # the local datasets are removed


def test_command_line_prints_json_and_refuses_bad_sizes(tmp_path: Path) -> None:
    p = _run("bench", "dataset", "--sizes", "30,60", "--tokens", "4", "--ranks", "4",
            "--model", "tiny-qwen3-moe", "--repeats", "1", "--no-s3", "--workdir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [r["backend"] for r in doc["results"]] == ["local", "local"]
    bad = _run("bench", "dataset", "--sizes", "ten", "--no-s3")
    assert bad.returncode != 0 and "--sizes" in (bad.stdout + bad.stderr)
