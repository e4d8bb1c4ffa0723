"""A geometry is untrusted input when it comes from a manifest, a shard's schema or a config:
absurd or wrong-typed values are a GeometryError, never a huge allocation or a silent
coercion."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.geometry import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    GeometryError,
    RoutingGeometry,
)

GOOD = {"num_layers": 4, "moe_layers": [0, 1, 2, 3], "top_k": 2, "num_experts": 8}


def test_bounds_are_the_documented_ones():
    assert (MAX_LAYERS, MAX_EXPERTS, MAX_TOP_K) == (2**16, 2**16, 2**10)


@pytest.mark.parametrize("args, message", [
    ((10**13, (0,), 2, 8), r"num_layers must be an integer in \[1, 65536\], got 10000000000000"),
    ((MAX_LAYERS + 1, (0,), 2, 8), "num_layers must be an integer in"),
    ((0, (0,), 2, 8), "num_layers must be an integer in"),
    ((-4, (0,), 2, 8), "num_layers must be an integer in"),
    ((4, (0,), 2, MAX_EXPERTS + 1), r"num_experts must be an integer in \[1, 65536\]"),
    ((4, (0,), 2, 10**30), "num_experts must be an integer in"),
    ((4, (0,), 0, 8), r"top_k must be an integer in \[1, 8\]"),
    ((4, (0,), 9, 8), r"top_k must be an integer in \[1, 8\]"),
    ((4, (0,), MAX_TOP_K + 1, MAX_EXPERTS), r"top_k must be an integer in \[1, 1024\]"),
    ((4, (-1, 0), 2, 8), r"moe_layers must be sorted, unique and in \[0, 4\)"),
    ((4, (0, 4), 2, 8), r"moe_layers must be sorted, unique and in \[0, 4\)"),
    ((4, (), 2, 8), "at least one MoE layer"),
    ((4.0, (0,), 2, 8), "num_layers must be an integer in .* got 4.0"),
    ((True, (0,), 1, 8), "num_layers must be an integer in .* got True"),
    (("4", (0,), 2, 8), "num_layers must be an integer in .* got '4'"),
    ((4, (0,), 2.5, 8), "top_k must be an integer"),
    ((4, (0,), 2, "8"), "num_experts must be an integer"),
    ((4, (0, 1.5), 2, 8), "moe_layers must be integers, got 1.5"),
    ((4, (0, True), 2, 8), "moe_layers must be integers, got True"),
    ((4, "01", 2, 8), "moe_layers must be a sequence of integers"),
    ((4, None, 2, 8), "moe_layers must be a sequence of integers"),
])
def test_absurd_or_wrong_typed_values_are_refused(args, message):
    with pytest.raises(GeometryError, match=message):
        RoutingGeometry(*args)


def test_largest_sane_geometry_and_numpy_integers_are_accepted():
    g = RoutingGeometry(MAX_LAYERS, (0, MAX_LAYERS - 1), MAX_TOP_K, MAX_EXPERTS)
    assert g.id_dtype == np.uint16 and g.num_moe_layers == 2
    g = RoutingGeometry(np.int64(4), (np.int32(1), np.uint8(3)), np.int16(2), np.int64(8))
    assert (g.num_layers, g.moe_layers, g.top_k, g.num_experts) == (4, (1, 3), 2, 8)
    assert all(type(v) is int for v in (g.num_layers, g.top_k, g.num_experts, *g.moe_layers))


@pytest.mark.parametrize("edit, message", [
    ({"num_layers": 10**13}, "num_layers must be an integer"),
    ({"num_layers": "4"}, "num_layers must be an integer"),
    ({"num_layers": 4.7}, "num_layers must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"num_experts": None}, "num_experts must be an integer"),
    ({"moe_layers": "0123"}, "moe_layers must be a sequence of integers"),
    ({"moe_layers": {"0": 1}}, "moe_layers must be a sequence of integers"),
    ({"moe_layers": list(range(MAX_LAYERS + 1))}, "moe_layers holds 65537 entries"),
    ({"moe_layers": [0, "1"]}, "moe_layers must be integers"),
    ({"name": 7}, "name must be a string"),
    ({"name": "x" * 300}, "name must be a string of at most 200 characters"),
    ({"id_dtype": 5}, "id_dtype"),
])
def test_from_dict_refuses_what_a_manifest_may_carry(edit, message):
    with pytest.raises(GeometryError, match=message):
        RoutingGeometry.from_dict({**GOOD, **edit})


def test_from_dict_refuses_a_missing_key_and_a_non_mapping():
    with pytest.raises(GeometryError, match="top_k"):
        RoutingGeometry.from_dict({k: v for k, v in GOOD.items() if k != "top_k"})
    with pytest.raises(GeometryError, match="must be an object"):
        RoutingGeometry.from_dict([1, 2])  # type: ignore[arg-type]
    assert RoutingGeometry.from_dict(GOOD) == RoutingGeometry(4, (0, 1, 2, 3), 2, 8)


@pytest.mark.parametrize("config, message", [
    ({"num_hidden_layers": "many", "num_experts": 8, "num_experts_per_tok": 2},
     "num_hidden_layers must be an integer of at most 65536, got 'many'"),
    ({"num_hidden_layers": 10**13, "num_experts": 8, "num_experts_per_tok": 2},
     "num_hidden_layers must be an integer of at most 65536, got 10000000000000"),
    ({"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": [2]},
     "top_k must be an integer"),
])
def test_hf_config_with_absurd_values_is_a_geometry_error(config, message):
    with pytest.raises(GeometryError, match=message):
        RoutingGeometry.from_hf_config(config)


def test_unreadable_config_is_a_geometry_error(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(GeometryError, match="cannot read"):
        RoutingGeometry.from_model_dir(tmp_path)
