"""Every guard fires before the first step, with a message that says what is wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.trainer_hooks.megatron import support as S
from replay_bridge.geometry import GeometryMismatch
from trainer_hooks.megatron import (
    LayoutError,
    MissingSample,
    Packing,
    ReplayConfigError,
    ReplayStateError,
    RoutingReplay,
    model_geometry,
    moe_routers,
)

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def test_replay_not_enabled_in_the_model_config():
    model = S.build_model(moe_enable_routing_replay=False)
    with pytest.raises(ReplayConfigError, match="moe_enable_routing_replay=True"):
        RoutingReplay(model, model_geometry(model.config))


def test_fused_router_is_refused():
    model = S.build_model(moe_router_fusion=True)
    with pytest.raises(ReplayConfigError, match="moe_router_fusion=True.*silently do nothing"):
        RoutingReplay(model, model_geometry(model.config))


def test_token_dropping_is_refused_unless_allowed():
    model = S.build_model(moe_expert_capacity_factor=1.0)
    geo = model_geometry(model.config)
    with pytest.raises(ReplayConfigError, match="capacity_factor=1.0.*allow_token_dropping"):
        RoutingReplay(model, geo)
    RoutingReplay(model, geo, allow_token_dropping=True).close()


@pytest.mark.parametrize(
    "field,value,needle",
    [("top_k", 3, "top_k: 3 vs 2"), ("num_experts", 16, "num_experts: 16 vs 8"),
     ("num_layers", 6, "num_layers: 6 vs 4")],
)
def test_geometry_mismatch_between_shards_and_model(field, value, needle):
    model = S.build_model()
    geo = model_geometry(model.config)
    other = dataclasses.replace(geo, **{field: value})
    with pytest.raises(GeometryMismatch, match=needle):
        RoutingReplay(model, other)


def test_moe_layer_mismatch_between_shards_and_model():
    model = S.build_model(moe_layer_freq=[0, 1, 1, 1])
    geo = dataclasses.replace(model_geometry(model.config), moe_layers=(0, 1, 2, 3))
    with pytest.raises(GeometryMismatch, match="moe_layers"):
        RoutingReplay(model, geo)


def test_router_count_on_this_rank_differs_from_the_geometry():
    """A model whose spec puts routers where its config (and the shards) say dense."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    config = S.model_config(moe_layer_freq=[0, 1, 1, 1])
    model = GPTModel(config=config, vocab_size=S.VOCAB, max_sequence_length=64,
                     transformer_layer_spec=get_gpt_layer_local_spec(num_experts=8))
    with pytest.raises(ReplayConfigError, match=r"routers at \[0, 1, 2, 3\].*\[1, 2, 3\].*4 routers, expected 3"):
        RoutingReplay(model, model_geometry(config))


def test_routers_left_over_from_another_model_are_left_alone():
    """RouterReplay instances of a model built earlier (still in megatron's process-wide list)
    no longer refuse the next model: the replay takes this model's routers and nothing else."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    first = S.build_model()  # clears, then registers 4 instances
    config = S.model_config()
    second = GPTModel(config=config, vocab_size=S.VOCAB, max_sequence_length=64,
                      transformer_layer_spec=get_gpt_decoder_block_spec(config, False))
    listed = RouterReplay.global_router_replay_instances
    firsts = [m.router_replay for m in first.modules() if hasattr(m, "router_replay")]
    seconds = [m.router_replay for m in second.modules() if hasattr(m, "router_replay")]
    assert listed == firsts + seconds and len(firsts) == 4
    replay = RoutingReplay(second, model_geometry(config))
    assert [s.replay for s in replay._slots] == seconds
    assert all("get_replay_topk" not in vars(r) for r in firsts)
    assert RouterReplay.global_router_replay_instances == firsts + seconds  # not cleared
    replay.close()


def test_missing_sample_and_row_count_and_bad_ids():
    model = S.build_model()
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [6, 5], seed=1)
    source = {s.sample_id: s for s in samples}
    replay = RoutingReplay(model, geo, source=source, packing=Packing.thd(2))
    replay.prepare(["s0", "s1"])
    with pytest.raises(MissingSample, match="sample 'nope' .*not in the routing source"):
        replay.prepare(["s0", "nope"])

    short = dataclasses.replace(samples[0], routed=samples[0].routed[:-1])
    with pytest.raises(LayoutError, match="sample 's0': 6 tokens .* need 5 routing rows, the sample has 4"):
        replay.prepare([short])

    dup = samples[1].routed.copy()
    dup[3, 2, :] = 5
    with pytest.raises(LayoutError, match=r"sample 's1', token position 3, layer 2: a repeated expert id.*\[5, 5\]"):
        replay.prepare([samples[0], dataclasses.replace(samples[1], routed=dup)])

    oor = samples[0].routed.copy()
    oor[1, 0, 1] = 9
    with pytest.raises(LayoutError, match=r"sample 's0', token position 1, layer 0: an expert id outside \[0, 8\)"):
        replay.prepare([dataclasses.replace(samples[0], routed=oor)])

    with pytest.raises(LayoutError, match="trainer's sequence has 7 tokens, the stored sample 6"):
        replay.prepare(["s0"], seq_lengths=[7])
    replay.close()


def test_layout_that_does_not_match_the_model_input_and_too_many_forwards():
    model = S.build_model()
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [6, 5], seed=1)
    replay = RoutingReplay(model, geo)
    wrong = replay.prepare(samples, Packing.thd(4))  # 8 + 8 router tokens
    batch = S.batch_inputs(samples, Packing.thd(1))  # the trainer packs 11
    with pytest.raises(ReplayStateError, match="sees 11 tokens, top-2; its replay target is \\(16, 2\\)"):
        with replay.replaying([wrong], forward_only=True):
            S.run_pass(model, replay, [batch], 1, 11, 1, forward_only=True)
    ok = replay.prepare(samples, Packing.thd(1))
    with pytest.raises(ReplayStateError, match="forward 2 of model chunk 0 but the pass has 1"):
        with replay.replaying([ok], forward_only=True):
            S.run_pass(model, replay, [batch, batch], 2, 11, 1, forward_only=True)
    # Nothing is left behind by the failed passes.
    for s in replay._slots:
        assert s.replay.target_topk_idx is None and s.replay.router_replay_action is None
    replay.close()


def test_uint16_ids_widen_correctly():
    from replay_bridge.geometry import RoutingGeometry
    from trainer_hooks.megatron._replay import _upload
    from trainer_hooks.megatron import layout_routing
    import torch

    geo = RoutingGeometry(2, (0, 1), 2, 300)
    s = S.make_samples(RoutingGeometry(2, (0, 1), 2, 200), [4], seed=0)[0]
    s.routed = (s.routed.astype(np.uint16) + 100)
    host = layout_routing([s], geo, Packing.thd(1))
    assert host.ids.dtype == np.uint16
    mb = _upload(host, torch.device("cpu"))
    np.testing.assert_array_equal(mb.ids.permute(1, 0, 2).numpy(), host.ids.astype(np.int64))


def test_one_replay_per_model_at_a_time():
    model = S.build_model()
    geo = model_geometry(model.config)
    first = RoutingReplay(model, geo)
    with pytest.raises(ReplayConfigError, match="another RoutingReplay is attached"):
        RoutingReplay(model, geo)
    first.close()
    RoutingReplay(model, geo).close()



def test_a_router_replay_swapped_after_the_replay_was_built_is_refused_at_the_pass():
    from megatron.core.transformer.moe.router_replay import RouterReplay

    model = S.build_model()
    geo = model_geometry(model.config)
    replay = RoutingReplay(model, geo)
    with replay.replaying([]):
        pass
    moe_routers(model)[1].module.router_replay = RouterReplay()  # nothing would drive it
    with pytest.raises(ReplayStateError, match=r"layer 1 .*holds another RouterReplay"):
        with replay.replaying([]):
            pass
    replay.close()
