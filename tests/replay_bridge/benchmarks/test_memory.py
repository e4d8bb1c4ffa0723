"""``bench memory``: the JSON of one tiny run (shape and counts; never the memory figures), the
command line, and the rejected traffic it generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay_bridge.benchmarks import memory as bench
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from tests.replay_bridge.shards.helpers import run_cli


def test_generated_traffic_is_all_rejected_as_all_zero(tmp_path: Path) -> None:
    g = RoutingGeometry.from_preset("tiny-qwen3-moe")
    bench.write_rejected_jsonl(tmp_path / "r.jsonl", g, 3, 40)
    result = ingest(tmp_path / "r.jsonl", g, "sglang", tmp_path / "out")
    assert result.stored == 0 and result.rejected == 3
    assert [s["kinds"] for s in result.samples] == [["all_zero"]] * 3


def test_tiny_run_reports_both_parts_at_n_and_factor_n(tmp_path: Path) -> None:
    r = bench.run(samples=2, factor=2, rows=40, concurrency=2, workdir=tmp_path)
    assert r["bench"] == "memory" and r["samples"] == [2, 4]
    for part in ("ingest", "collect"):
        small, large = r[part]["n"], r[part]["2n"]
        assert (small["samples"], large["samples"]) == (2, 4)
        assert small["stored"] == large["stored"] == 0  # every sample is rejected
        assert (small["rejected"], large["rejected"]) == (2, 4)
        assert small["peak_rss_bytes"] > 0 and large["peak_rss_bytes"] > 0
        assert r[part]["ratio"] == pytest.approx(
            large["peak_rss_bytes"] / small["peak_rss_bytes"], abs=1e-3)
        assert f"{part}_ratio<=1.2" in r["targets"]
    assert list(tmp_path.iterdir()) == []  # temporary files are gone


def test_command_line_prints_json_for_one_part(tmp_path: Path) -> None:
    code, doc, out = run_cli("bench", "memory", "--samples", "1", "--factor", "2", "--rows",
                             "20", "--only", "ingest", "--workdir", tmp_path, "--json")
    assert code == 0, out
    assert set(doc) >= {"ingest", "targets", "rows_per_sample"} and "collect" not in doc
    code, doc, _ = run_cli("bench", "memory", "--only", "nothing", "--json")
    assert code == 2 and "--only" in doc["error"]
