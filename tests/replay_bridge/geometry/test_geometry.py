"""Geometry from HF configs of every supported family, presets and model directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replay_bridge.geometry import (
    GeometryError,
    GeometryMismatch,
    RoutingGeometry,
    hf_moe_layers,
    list_presets,
)


@pytest.mark.parametrize(
    "config, layers, moe, k, e",
    [
        ({"model_type": "qwen3_moe", "num_hidden_layers": 6, "num_experts": 128,
          "num_experts_per_tok": 8, "mlp_only_layers": [0, 3], "decoder_sparse_step": 1},
         6, (1, 2, 4, 5), 8, 128),
        ({"model_type": "qwen2_moe", "num_hidden_layers": 6, "num_experts": 60,
          "num_experts_per_tok": 4, "decoder_sparse_step": 2}, 6, (1, 3, 5), 4, 60),
        ({"model_type": "mixtral", "num_hidden_layers": 4, "num_local_experts": 8,
          "num_experts_per_tok": 2}, 4, (0, 1, 2, 3), 2, 8),
        ({"model_type": "deepseek_v3", "num_hidden_layers": 61, "n_routed_experts": 256,
          "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1},
         61, tuple(range(3, 61)), 8, 256),
        ({"model_type": "deepseek_v2", "num_hidden_layers": 8, "n_routed_experts": 64,
          "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2},
         8, (2, 4, 6), 6, 64),
        ({"model_type": "glm4_moe", "num_hidden_layers": 5, "n_routed_experts": 128,
          "num_experts_per_tok": 8, "first_k_dense_replace": 1}, 5, (1, 2, 3, 4), 8, 128),
        ({"model_type": "qwen3_vl_moe", "text_config": {
            "num_hidden_layers": 3, "num_experts": 300, "num_experts_per_tok": 1}},
         3, (0, 1, 2), 1, 300),
    ],
)
def test_families(config, layers, moe, k, e):
    g = RoutingGeometry.from_hf_config(config)
    assert (g.num_layers, g.moe_layers, g.top_k, g.num_experts) == (layers, moe, k, e)
    assert g.id_dtype == (np.uint8 if e <= 256 else np.uint16)
    assert hf_moe_layers(config) == moe  # the one MoE-layer rule (megatron's convert uses it)


def test_moe_layers_need_a_layer_count():
    with pytest.raises(GeometryError, match=r"config \(qwen3_moe\) has no num_hidden_layers"):
        hf_moe_layers({"model_type": "qwen3_moe", "num_experts": 8})


def test_presets():
    names = list_presets()
    for required in ("qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "tiny-qwen3-moe"):
        assert required in names
    q = RoutingGeometry.from_preset("qwen3-30b-a3b")
    assert (q.num_layers, q.num_moe_layers, q.top_k, q.num_experts) == (48, 48, 8, 128)
    d = RoutingGeometry.from_preset("deepseek-v3")
    assert d.dense_layers == (0, 1, 2) and d.ids_per_token == 58 * 8
    with pytest.raises(GeometryError, match="unknown model preset"):
        RoutingGeometry.from_preset("nope")


def test_resolve_model_dir_and_config(tmp_path):
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8,
           "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert RoutingGeometry.resolve(tmp_path).num_layers == 2
    assert RoutingGeometry.resolve(tmp_path / "config.json").top_k == 2
    assert RoutingGeometry.resolve("tiny-qwen3-moe").num_experts == 8
    with pytest.raises(GeometryError, match="neither"):
        RoutingGeometry.resolve(str(tmp_path / "missing"))


def test_dense_model_is_refused():
    with pytest.raises(GeometryError, match="not a routed MoE"):
        RoutingGeometry.from_hf_config({"model_type": "llama", "num_hidden_layers": 2})


def test_round_trip_and_mismatch():
    g = RoutingGeometry(6, (1, 2, 3), 4, 300)
    assert RoutingGeometry.from_dict(g.to_dict()) == g
    with pytest.raises(GeometryError, match="id_dtype"):
        RoutingGeometry.from_dict({**g.to_dict(), "id_dtype": "uint8"})
    with pytest.raises(GeometryMismatch, match="top_k: 4 vs 2"):
        g.require_same(RoutingGeometry(6, (1, 2, 3), 2, 300))
    with pytest.raises(GeometryError):
        RoutingGeometry(4, (3, 1), 2, 8)
