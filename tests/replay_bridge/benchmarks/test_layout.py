"""bench layout: a small run; JSON keys and sane values, never a timing threshold."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from replay_bridge.benchmarks.layout import layout_before, micro_batch, run
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import Packing, layout_routing
from tests.support.processes import child_env, cli


def test_small_run_reports_every_case_before_and_after_with_a_breakdown() -> None:
    out = run(tokens=256, models=("tiny-qwen3-moe", "deepseek-v3"), repeats=1, calls=1)
    assert out["benchmark"] == "layout" and out["tokens"] == 256 and out["target_ms"] == 2.0
    assert out["threads"]["how"]
    cases = {(r["model"], r["case"]) for r in out["results"]}
    assert cases == {(m, c) for m in ("tiny-qwen3-moe", "deepseek-v3")
                     for c in ("thd", "bshd", "thd_cp2_sp2_rank0")}
    for r in out["results"]:
        for key in ("before_ms", "after_ms", "before_no_validate_ms", "after_no_validate_ms"):
            assert r[key] > 0
        assert set(r["after_breakdown_ms"]) == {"index", "gather", "pad", "validate", "region"}
        assert all(v >= 0 for v in r["after_breakdown_ms"].values())
        assert r["native_tokens"] > 0 and r["stored_rows_used"] > 0
        assert isinstance(r["meets_target"], bool)
    thd = [r for r in out["results"] if r["case"] == "thd"]
    assert all(r["router_tokens"] == 256 for r in thd)
    assert out["target"]["cases"] == ["thd", "bshd"] and isinstance(out["target"]["met"], bool)


def test_the_micro_batch_has_late_routing_starts_and_native_rows_and_lays_out_as_before() -> None:
    g = RoutingGeometry.resolve("qwen3-30b-a3b")
    samples = micro_batch(g, 512)
    assert sum(s.num_tokens for s in samples) == 512
    assert any(s.routed_start > 0 for s in samples) and any(s.native is not None for s in samples)
    a = layout_routing(samples, g, Packing.thd())
    b = layout_before(samples, g, Packing.thd())
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.region, b.region)


def test_command_line_prints_json() -> None:
    p = subprocess.run(cli("bench", "layout", "--tokens", "128", "--models", "tiny-qwen3-moe",
                           "--repeats", "1", "--calls", "1"),
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["benchmark"] == "layout" and len(doc["results"]) == 3
    assert "met" in doc["target"]
