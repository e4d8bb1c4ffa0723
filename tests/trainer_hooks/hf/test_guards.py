"""The hook refuses, with a message naming what is wrong: a geometry that is not the model's,
a family it has no adapter for, a sample the source lacks, a token count that differs from the
stored sample's, duplicate or out-of-range ids, batches it cannot lay out, a batch other than
the one prepared, a second replay on the same routers, a router replaced after it was built."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from replay_bridge.geometry import GeometryMismatch
from tests.trainer_hooks.hf import support as S
from trainer_hooks.hf import (
    LayoutError,
    MissingSample,
    ReplayConfigError,
    ReplayStateError,
    RoutingReplay,
    model_geometry,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return S.build_model("qwen3_moe")


@pytest.fixture
def replay(model):
    r = RoutingReplay(model, model_geometry(model))
    yield r
    r.close()


def test_geometry_differing_from_the_models_is_refused(model) -> None:
    g = model_geometry(model)
    with pytest.raises(GeometryMismatch, match=r"top_k: 2 vs 4"):
        RoutingReplay(model, dataclasses.replace(g, top_k=4))
    with pytest.raises(GeometryMismatch, match=r"moe_layers: \(0, 2, 3\) vs \(0, 1, 2, 3\)"):
        RoutingReplay(model, dataclasses.replace(g, moe_layers=(0, 1, 2, 3)))
    with pytest.raises(GeometryMismatch, match=r"num_experts: 8 vs 16"):
        RoutingReplay(model, dataclasses.replace(g, num_experts=16))


def test_a_family_without_adapter_is_refused() -> None:
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2)
    llama = T.AutoModelForCausalLM.from_config(cfg)
    from replay_bridge.geometry import RoutingGeometry

    with pytest.raises(ReplayConfigError, match=r"no routing replay adapter for model_type "
                       r"'llama'; covered: deepseek_v3, glm4_moe, mixtral, qwen2_moe, qwen3_moe"):
        RoutingReplay(llama, RoutingGeometry(1, (0,), 2, 8))


def test_a_model_that_does_not_follow_its_config_is_refused(model) -> None:
    g = model_geometry(model)
    model.config.mlp_only_layers = [1, 2]  # the config now says layer 2 is dense
    try:
        with pytest.raises(ReplayConfigError, match=r"routers sit at layers \[0, 2, 3\], its "
                           r"config routes at \[0, 3\]"):
            RoutingReplay(model, dataclasses.replace(g, moe_layers=(0, 3)))
    finally:
        model.config.mlp_only_layers = [1]


def test_a_second_replay_on_the_same_model_is_refused(model, replay) -> None:
    with pytest.raises(ReplayConfigError, match="another RoutingReplay is attached"):
        RoutingReplay(model, model_geometry(model))
    replay.close()
    RoutingReplay(model, model_geometry(model)).close()  # free again after close()


def test_a_sample_the_source_lacks_is_named(model) -> None:
    g = model_geometry(model)
    samples = S.make_samples(g, [6, 5])
    r = RoutingReplay(model, g, source={samples[0].sample_id: samples[0]})
    batch = S.padded_batch(samples, 8, "right")
    with pytest.raises(MissingSample, match=r"sample 's1' \(micro-batch item 1\) is not in the "
                       "routing source"):
        r.prepare(["s0", "s1"], attention_mask=batch["attention_mask"])
    r.close()


def test_token_counts_that_differ_from_the_stored_sample_are_refused(replay, model) -> None:
    samples = S.make_samples(model_geometry(model), [6, 5])
    mask = S.padded_batch(samples, 8, "right")["attention_mask"]
    mask[1, 5] = 1  # the trainer's row 1 has 6 tokens, the sample 5
    with pytest.raises(LayoutError, match=r"sample 's1': the trainer's sequence has 6 tokens, "
                       "the stored sample 5"):
        replay.prepare(samples, attention_mask=mask)
    packed = S.packed_batch(samples)
    with pytest.raises(LayoutError, match="the batch holds 2 sequences, the micro-batch lists 1"):
        replay.prepare(samples[:1], position_ids=packed["position_ids"], packing="packed")


@pytest.mark.parametrize("fault, rule", [("repeat", "a repeated expert id"),
                                         ("range", r"an expert id outside \[0, 8\)")])
def test_duplicate_and_out_of_range_ids_are_refused(replay, model, fault, rule) -> None:
    samples = S.make_samples(model_geometry(model), [6, 5])
    blk = samples[1].routed[2, 1]
    if fault == "repeat":
        blk[1] = blk[0]
    else:
        blk[0] = 9
    mask = S.padded_batch(samples, 8, "left")["attention_mask"]
    with pytest.raises(LayoutError, match=rf"sample 's1', token position 2, layer 2: {rule}"):
        replay.prepare(samples, attention_mask=mask)


def test_batches_that_cannot_be_laid_out_are_refused(replay, model) -> None:
    samples = S.make_samples(model_geometry(model), [4, 4])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    with pytest.raises(LayoutError, match="attention_mask row 0 has its valid tokens in 2 "
                       "separate runs"):
        replay.prepare(samples, attention_mask=mask)
    with pytest.raises(LayoutError, match="a padded micro-batch needs its attention_mask"):
        replay.prepare(samples)
    with pytest.raises(LayoutError, match="a packed micro-batch needs its position_ids"):
        replay.prepare(samples, packing="packed")
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 0, 0]])
    with pytest.raises(LayoutError, match=r"packed batch row 0, column 7: a token that "
                       "continues no sequence"):
        replay.prepare(samples, position_ids=pos, attention_mask=mask, packing="packed")


def test_a_batch_other_than_the_prepared_one_is_refused(replay, model) -> None:
    samples = S.make_samples(model_geometry(model), [6, 5])
    batch = S.padded_batch(samples, 8, "right")
    mb = replay.prepare(samples, attention_mask=batch["attention_mask"])
    other = S.padded_batch(samples, 9, "right")
    with replay.replaying(mb), pytest.raises(ReplayStateError, match=r"router at layer 0 "
                                             r"\(model.layers.0.mlp.gate\) sees 18 tokens, the "
                                             r"micro-batch was laid out for 16 \(2 x 8\)"):
        model(**other)
    with replay.replaying(mb):  # the pass was cleared on the error; the right batch runs
        with pytest.raises(ReplayStateError, match="a replay pass is already active"):
            with replay.replaying(mb):
                pass
        model(**batch)


def test_a_router_replaced_after_the_replay_was_built_is_refused(model) -> None:
    fresh = S.build_model("qwen3_moe", seed=1)
    r = RoutingReplay(fresh, model_geometry(fresh))
    samples = S.make_samples(model_geometry(fresh), [6])
    mb = r.prepare(samples, attention_mask=torch.ones(1, 6, dtype=torch.long))
    block = fresh.model.layers[2].mlp
    block.gate = type(block.gate)(fresh.config)
    with pytest.raises(ReplayStateError, match=r"router at layer 2 \(model.layers.2.mlp.gate\) "
                       "is no longer the module this replay hooked"):
        with r.replaying(mb):
            pass
    r.close()
    with pytest.raises(ReplayStateError, match="this RoutingReplay is closed"):
        with r.replaying(mb):
            pass


def test_grid_layout_matches_a_per_sample_reference(model) -> None:
    """The vectorised grid scatter against the samples' own ``full_routing`` per row."""
    g = model_geometry(model)
    samples = S.make_samples(g, [7, 3, 9], seed=9, routed_start=[2], native={2: [1, 4]})
    r = RoutingReplay(model, g, packing="packed")
    batch = S.packed_batch(samples, pad=4)
    host = r.layout(samples, position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"])
    spans = [(0, 7), (7, 3), (10, 9)]
    for j in range(g.num_moe_layers):
        want, has = S.expected_rows(samples, spans, 23, j)
        assert np.array_equal(host.ids[has, j].astype(np.int64), want[has])
    assert (host.region[~has] >= 2).all() and (host.region[has] < 2).all()
    r.close()
