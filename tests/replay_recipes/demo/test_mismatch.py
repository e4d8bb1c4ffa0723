"""The routing meter (experts used vs rollout ids, per layer and region) and the log-prob
mismatch figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.transformer.moe.router import TopKRouter

from replay_recipes.demo.mismatch import RoutingMeter, logp_mismatch
from trainer_hooks.megatron import COMPLETION, PAD, PROMPT, HostRouting

E, K = 8, 2


class _Router(TopKRouter):
    """A megatron ``TopKRouter`` (so the router discovery finds it) that returns
    (probs, routing_map) routing to ``ids``."""

    def __init__(self, layer_number: int) -> None:
        torch.nn.Module.__init__(self)  # no config: only the discovery and the hook matter
        self.layer_number = layer_number
        self.ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        rm = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter(1, self.ids, True)
        return rm.float(), rm


class _Layer(torch.nn.Module):
    def __init__(self, number: int, moe: bool) -> None:
        super().__init__()
        self.layer_number = number
        self.mlp = torch.nn.Module()
        if moe:
            self.mlp.router = _Router(number)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([_Layer(1, False), _Layer(2, True),
                                                   _Layer(3, True)])


def test_counts_exact_and_overlap_by_layer_and_region():
    model = _Model()
    meter = RoutingMeter(model, (1, 2), K)
    rollout = np.array([[[0, 1], [2, 3]],   # prompt
                        [[4, 5], [6, 7]],   # completion
                        [[0, 1], [0, 1]]],  # pad: never counted
                       np.uint8)
    host = HostRouting(ids=rollout, region=np.array([PROMPT, COMPLETION, PAD], np.int8),
                       layers=(1, 2), sample_ids=("s",), cu_seqlens_padded=np.array([0, 3]))
    meter.expect(host)
    r1, r2 = model.decoder.layers[1].mlp.router, model.decoder.layers[2].mlp.router
    r1.ids = torch.tensor([[1, 0], [4, 6], [2, 3]])  # same set (order differs); one of two; pad
    r2.ids = torch.tensor([[2, 3], [6, 7], [2, 3]])  # both exact
    x = torch.zeros(3, 4)
    r1(x), r2(x)
    m = meter.read()
    assert m["blocks"] == 4
    assert m["exact"] == pytest.approx(3 / 4)
    assert m["overlap"] == pytest.approx(7 / 8)
    assert m["prompt"]["exact"] == 1.0 and m["completion"]["exact"] == 0.5
    assert m["layers"][1] == {"blocks": 2, "exact": 0.5, "overlap": 0.75}
    assert m["layers"][2]["exact"] == 1.0
    assert meter.read()["blocks"] == 0  # read resets
    meter.close()
    r1(x)
    assert meter.counts.sum() == 0  # hooks removed


def test_layers_must_match_the_model():
    with pytest.raises(ValueError, match="routers are at layers"):
        RoutingMeter(_Model(), (0, 1, 2), K)


def test_token_count_mismatch_is_an_error():
    model = _Model()
    meter = RoutingMeter(model, (1, 2), K)
    meter.expect(HostRouting(ids=np.zeros((2, 2, K), np.uint8), region=np.zeros(2, np.int8),
                             layers=(1, 2), sample_ids=("s",),
                             cu_seqlens_padded=np.array([0, 2])))
    model.decoder.layers[1].mlp.router.ids = torch.tensor([[0, 1]] * 3)
    with pytest.raises(ValueError, match="saw 3 tokens"):
        model.decoder.layers[1].mlp.router(torch.zeros(3, 4))


def test_logp_mismatch_figures():
    r = np.array([0.0, 0.1, -0.2])
    m = logp_mismatch(r)
    assert m["tokens"] == 3
    assert m["k3_kl"] == pytest.approx(np.mean(np.exp(r) - 1 - r))
    assert m["mean_abs"] == pytest.approx(0.1) and m["max_abs"] == pytest.approx(0.2)
    assert m["k3_kl"] > 0
    assert logp_mismatch(np.zeros(4))["k3_kl"] == 0.0
