"""Dense layers are never captured: their blocks on the wire stay zero."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.checks import check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample
from reference_engine import ModelRunner, SamplingSpec


@pytest.fixture(scope="module")
def mixed_model_dir(tmp_path_factory):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from reference_engine.tiny_model import TINY_CONFIG

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**TINY_CONFIG, "num_hidden_layers": 3, "mlp_only_layers": [1]})
    path = tmp_path_factory.mktemp("mixed")
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


def test_dense_layer_blocks_are_zero(mixed_model_dir):
    runner = ModelRunner(mixed_model_dir, dtype="float32")
    geometry = RoutingGeometry.from_model_dir(mixed_model_dir)
    assert geometry.moe_layers == (0, 2) and geometry.num_layers == 3
    prompt = [3, 14, 15, 92, 65]
    g = runner.generate(prompt, SamplingSpec(max_new_tokens=6, temperature=0.0))
    assert g.routing.shape == (len(prompt) + len(g.output_ids) - 1, 3, 2)
    assert not g.routing[:, 1].any()
    assert (g.routing[:, [0, 2], 0] != g.routing[:, [0, 2], 1]).all()
    np.testing.assert_array_equal(g.routing, runner.forward_routing(prompt + g.output_ids)[:-1])
    sample = WireSample(sample_id="m", tokens=np.asarray(prompt + g.output_ids, np.int32),
                        prompt_len=len(prompt), routing=g.routing)
    assert check_sample(sample, geometry).ok
