"""The agreement counting core (ids against ids, a routing map against ids) and the router
discovery that the replay and the demo's meter share."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_hooks.megatron import (
    COMPLETION,
    NATIVE,
    PAD,
    PROMPT,
    AgreementCounter,
    moe_routers,
)
from trainer_hooks.megatron._metrics import flat_figures

E, K = 8, 2
REGION = torch.tensor([PROMPT, PROMPT, COMPLETION, PAD])
REFERENCE = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
# Same set in another order; one of two; none; pad (never reported).
OTHER = torch.tensor([[1, 0], [2, 7], [1, 2], [6, 7]])


def _routing_map(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape[0], E, dtype=torch.bool).scatter(1, ids, True)


def test_ids_and_routing_maps_count_the_same_blocks():
    by_ids, by_map = AgreementCounter((3, 5), K), AgreementCounter((3, 5), K)
    for c, add in ((by_ids, by_ids.add_topk), (by_map, by_map.add_routing_map)):
        other = OTHER if c is by_ids else _routing_map(OTHER)
        add(0, other, REFERENCE, REGION)
        add(1, REFERENCE if c is by_ids else _routing_map(REFERENCE), REFERENCE, REGION)
    assert torch.equal(by_ids.counts, by_map.counts)
    m = by_ids.read()
    assert m["blocks"] == 6  # 3 routed positions x 2 layers; the pad row is left out
    assert m["exact"] == pytest.approx(4 / 6)
    assert m["overlap"] == pytest.approx((2 + 1 + 0 + 6) / 12)
    assert m["prompt"] == {"blocks": 4, "exact": 0.75, "overlap": pytest.approx(7 / 8)}
    assert m["completion"] == {"blocks": 2, "exact": 0.5, "overlap": 0.5}
    assert m["layers"][3] == {"blocks": 3, "exact": pytest.approx(1 / 3), "overlap": 0.5}
    assert m["layers"][5]["exact"] == 1.0


def test_a_token_sent_to_more_than_k_experts_is_not_exact():
    c = AgreementCounter((0,), K)
    rm = _routing_map(REFERENCE)
    rm[0, 7] = True  # the reference pair plus one more
    c.add_routing_map(0, rm, REFERENCE, REGION)
    m = c.read()
    assert m["exact"] == pytest.approx(2 / 3) and m["overlap"] == 1.0


def test_read_resets_on_request_and_flat_figures_skip_empty_parts():
    c = AgreementCounter((1, 2), K)
    c.add_topk(0, OTHER, REFERENCE, REGION)
    flat = flat_figures(c.read())
    assert flat["routing_replay/tokens"] == 3.0
    assert flat["routing_replay/exact"] == pytest.approx(1 / 3)
    assert flat["routing_replay/completion/overlap"] == 0.0
    assert "routing_replay/layer1/exact" in flat
    assert not any(k.startswith("routing_replay/layer2/") for k in flat)  # nothing counted
    assert c.read(reset=True)["blocks"] == 3
    empty = c.read()
    assert empty["blocks"] == 0 and math.isnan(empty["exact"])
    assert flat_figures(empty) == {"routing_replay/tokens": 0.0,
                                   "routing_replay/prompt/tokens": 0.0,
                                   "routing_replay/completion/tokens": 0.0,
                                   "routing_replay/native/tokens": 0.0}


def test_native_rows_are_counted_apart_and_never_compared():
    """Native rows (own top-k, pad ids in the layout) neither lower nor raise exact/overlap."""
    region = torch.tensor([PROMPT, NATIVE, COMPLETION, NATIVE, PAD])
    reference = torch.cat((REFERENCE, torch.tensor([[0, 1]])))
    own = torch.tensor([[0, 1], [5, 6], [4, 5], [0, 1], [2, 3]])
    for add, ids in (("add_topk", own), ("add_routing_map", _routing_map(own))):
        c = AgreementCounter((2, 4), K)
        getattr(c, add)(0, ids, reference, region)
        getattr(c, add)(1, ids, reference, region)
        m = c.read()
        assert m["blocks"] == 4 and m["exact"] == 1.0 and m["overlap"] == 1.0
        assert m["native"] == {"blocks": 4}
        assert m["layers"][2] == {"blocks": 2, "exact": 1.0, "overlap": 1.0}
        flat = flat_figures(m)
        assert flat["routing_replay/native/tokens"] == 4.0
        assert flat["routing_replay/tokens"] == 4.0
        assert flat["routing_replay/prompt/tokens"] == 2.0
        assert flat["routing_replay/completion/tokens"] == 2.0


@pytest.mark.usefixtures("megatron_cpu")
def test_router_discovery_walks_the_model_and_leaves_mtp_out_unless_asked():
    from tests.trainer_hooks.megatron import support as S

    model = S.build_model(mtp=True, mtp_num_layers=1, moe_layer_freq=[0, 1, 1, 1])
    routers = moe_routers(model)
    assert [r.layer for r in routers] == [1, 2, 3]
    assert all(r.module is model.decoder.layers[r.layer].mlp.router for r in routers)
    assert not any(r.mtp for r in routers)
    with_mtp = moe_routers([model], mtp=True)
    assert [r.mtp for r in with_mtp] == [False, False, False, True]
    assert with_mtp[-1].name.startswith("mtp.")
