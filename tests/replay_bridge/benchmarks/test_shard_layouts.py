"""bench shard-layouts: every layout decodes back to exactly the input ids in engine order;
JSON keys; never a timing threshold."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from replay_bridge.benchmarks.routing_model import RoutingModel
from replay_bridge.benchmarks.shard_layouts import (
    DEFAULT_VARIANTS, LAYOUTS, decode, encode, run, uniform_routing)
from replay_bridge.geometry import RoutingGeometry
from tests.support.processes import child_env, cli

MODELS = ("qwen3-30b-a3b", "deepseek-v3", "tiny-qwen3-moe")


# Only the layouts that apply to each geometry (7-bit packing needs < 128 experts, ...).
CASES = [(m, name) for m in MODELS for name, lay in LAYOUTS.items()
         if lay.applies(RoutingGeometry.resolve(m))]


def test_every_layout_applies_to_some_geometry() -> None:
    assert {name for _, name in CASES} == set(LAYOUTS)


@pytest.mark.parametrize("model, layout", CASES)
def test_every_layout_round_trips_exactly_in_engine_order(model: str, layout: str) -> None:
    g = RoutingGeometry.resolve(model)
    rows = 701  # record batches of 200, 200, 200 and 101 rows
    for r in (RoutingModel(g, seed=3).routing(rows), uniform_routing(g, rows, seed=3)):
        # engine order matters: a block in reverse order is a different input
        assert not np.array_equal(r, r[..., ::-1])
        for codec, level in (("zstd", 3), ("lz4", None), ("none", None)):
            data = encode(r, g, layout, codec, level, rows_per_batch=200)
            for threads in (True, False):
                out = decode(data, g, layout, [200, 200, 200, 101], use_threads=threads)
                assert [o.shape for o in out] == [(n, g.num_moe_layers, g.top_k)
                                                  for n in (200, 200, 200, 101)]
                assert all(o.dtype == g.id_dtype for o in out)
                np.testing.assert_array_equal(np.concatenate(out), r)


def test_uniform_routing_is_valid_and_flat() -> None:
    g = RoutingGeometry.resolve("qwen3-30b-a3b")
    r = uniform_routing(g, 2000, seed=1)
    s = np.sort(r, axis=-1)
    assert (np.diff(s.astype(int), axis=-1) > 0).all() and r.max() < g.num_experts
    load = np.bincount(r[:, 0].ravel(), minlength=g.num_experts)
    assert load.max() / load.mean() < 1.5


def test_small_run_reports_every_variant_and_each_decodes_exactly() -> None:
    out = run(tokens=300, models=("qwen3-30b-a3b", "deepseek-v3"), repeats=1,
              batch_bytes=32 << 10)
    assert out["benchmark"] == "shard-layouts" and out["tokens"] == 300
    assert {(d["model"], d["data"]) for d in out["data"]} == {
        (m, d) for m in ("qwen3-30b-a3b", "deepseek-v3") for d in ("realistic", "uniform")}
    for d in out["data"]:
        assert d["entropy_bits_per_id_per_layer"] > 0 and d["load_max_over_mean_per_layer"] >= 1
    keys = {"model", "data", "variant", "layout", "codec", "level", "bytes", "bytes_per_token",
            "ratio_to_int32", "ratio_to_wire_int32", "bits_per_id", "write_mb_s", "read_gb_s",
            "read_1thread_gb_s", "write_rounds", "engine_order_kept", "decodes_exactly"}
    for r in out["results"]:
        assert set(r) == keys
        assert r["decodes_exactly"] is True and r["engine_order_kept"] is True
        assert r["bytes"] > 0 and r["read_gb_s"] > 0 and r["write_mb_s"] > 0
    qwen = {r["variant"] for r in out["results"]
            if r["model"] == "qwen3-30b-a3b" and r["data"] == "realistic"}
    assert len(qwen) == len(DEFAULT_VARIANTS)
    assert {"flat/zstd-1", "layer-major/zstd-3", "packed7/none", "repeat-mask/zstd-3"} <= qwen
    assert set(out["target"]) == {"ratio_to_int32_max", "read_gb_s_min", "met_by"}


def test_command_line_prints_json() -> None:
    p = subprocess.run(cli("bench", "shard-layouts", "--tokens", "200", "--models",
                           "tiny-qwen3-moe", "--data", "uniform,reordered", "--layouts",
                           "flat,repeat-mask", "--repeats", "1"),
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["benchmark"] == "shard-layouts"
    assert {r["layout"] for r in doc["results"]} == {"flat", "repeat-mask"}
    assert {r["data"] for r in doc["results"]} == {"uniform", "reordered"}
    assert all(r["decodes_exactly"] for r in doc["results"])
    bad = subprocess.run(cli("bench", "shard-layouts", "--layouts", "nope"),
                         capture_output=True, text=True, env=child_env(), timeout=300)
    assert bad.returncode != 0


@pytest.mark.parametrize("layout", ["repeat-lm", "ref-lm"])
def test_c_kernels_and_their_numpy_fallbacks_decode_the_same(monkeypatch, layout: str) -> None:
    import replay_bridge.benchmarks.shard_layouts as sl

    for model in ("qwen3-30b-a3b", "deepseek-v3", "tiny-qwen3-moe"):
        g = RoutingGeometry.resolve(model)
        r = RoutingModel(g, seed=5).routing(333)
        shuffled = r.copy()  # shared experts that change slot between tokens
        np.random.default_rng(0).permuted(shuffled.reshape(-1, g.top_k), axis=1,
                                          out=shuffled.reshape(-1, g.top_k))
        for x in (r, shuffled):
            data = encode(x, g, layout, "zstd", 1, rows_per_batch=100)
            with_c = np.concatenate(decode(data, g, layout, [100, 100, 100, 33]))
            monkeypatch.setattr(sl, "c_decoder", lambda: None)  # no compiler
            without = np.concatenate(decode(data, g, layout, [100, 100, 100, 33]))
            monkeypatch.undo()
            np.testing.assert_array_equal(with_c, x)
            np.testing.assert_array_equal(without, x)


def test_the_study_reads_a_stored_dataset(tmp_path) -> None:
    from replay_bridge.benchmarks.shards import synthetic_samples
    from replay_bridge.shards import ShardWriter

    g = RoutingGeometry.resolve("qwen3-30b-a3b")
    samples = synthetic_samples(g, 600, seed=2)
    with ShardWriter(tmp_path / "ds", g) as w:
        for s in samples:
            w.add(s)
    out = run(tokens=500, dataset=str(tmp_path / "ds"), repeats=1,
              variants=(("flat", "zstd", 1), ("repeat-lm", "zstd", 1)))
    assert [d["data"] for d in out["data"]] == ["stored"]
    assert out["data"][0]["geometry"]["num_experts"] == 128
    assert [r["variant"] for r in out["results"]] == ["flat/zstd-1", "repeat-lm/zstd-1"]
    assert all(r["decodes_exactly"] for r in out["results"])
