"""Property: engine encoding -> decode -> check -> shard -> read returns the identical routing
(dtype, geometry, order) for every engine format and random geometries."""

from __future__ import annotations

import tempfile

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge.checks import accept
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter
from replay_bridge.protocols import decode_response
from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion


@st.composite
def geometries(draw: st.DrawFn) -> RoutingGeometry:
    layers = draw(st.integers(1, 6))
    dense = draw(st.integers(0, layers - 1))  # leading dense layers
    experts = draw(st.sampled_from([4, 8, 60, 128, 256, 257, 300]))
    top_k = draw(st.integers(1, min(8, experts)))
    return RoutingGeometry(layers, tuple(range(dense, layers)), top_k, experts)


@settings(max_examples=30, deadline=None)
@given(g=geometries(), engine=st.sampled_from(["sglang", "vllm"]), samples=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), compression=st.sampled_from(["zstd", "lz4", "none"]))
def test_engine_to_shard_round_trip(g, engine, samples, seed, compression):
    rng = np.random.default_rng(seed)
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, g, samples_per_shard=2, compression=compression) as w:
            for i in range(samples):
                prompt = rng.integers(0, 1000, int(rng.integers(1, 9))).tolist()
                out = rng.integers(0, 1000, int(rng.integers(0, 7))).tolist()
                start = int(rng.integers(0, len(prompt) + 1))
                r = routing(rng, max(len(prompt) + len(out) - 1 - start, 0), g)
                if engine == "sglang":
                    req, body = sglang_generate(prompt, out, r, start=start)
                else:
                    req, body = vllm_completion(prompt, [out], [r], str(g.id_dtype), start=start)
                [ws] = decode_response(engine, req, body, g, f"s{i}")
                report, sample = accept(ws, g)
                assert report.ok, report.message
                w.add(sample)
                expected[f"s{i}"] = (prompt + out, start, r[:, list(g.moe_layers), :])
        reader = ShardReader(tmp)
        assert reader.geometry == g
        for sid, (tokens, start, moe) in expected.items():
            s = reader[sid]
            assert s.tokens.tolist() == tokens and s.routed_start == start
            assert s.routed.dtype == g.id_dtype and s.routed.shape == moe.shape
            np.testing.assert_array_equal(s.routed, moe)
        reader.close()
