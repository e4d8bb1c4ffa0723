"""Router replay on real megatron-core models (CPU, one process): every router routes exactly
the replayed ids, native routing when replay is off, clean state between passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer_hooks.megatron import support as S
from trainer_hooks.megatron import (
    PAD,
    Packing,
    RoutingReplay,
    model_geometry,
)

pytestmark = pytest.mark.usefixtures("megatron_cpu")

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SIGMOID = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_topk_scaling_factor=2.5)


def _expected(mb, slot_index: int) -> np.ndarray:
    return np.sort(mb.host.ids[:, slot_index, :].astype(np.int64), axis=-1)


def _run(model, replay, samples_per_mb, packing, forward_only=False):
    mbs = [replay.prepare(s) for s in samples_per_mb]
    batches = [S.batch_inputs(s, packing) for s in samples_per_mb]
    seq = batches[0]["tokens"].shape[1]
    cap = S.RoutingCapture(model)
    try:
        with replay.replaying(mbs, forward_only=forward_only):
            S.run_pass(model, replay, batches, len(mbs), seq, batches[0]["tokens"].shape[0],
                       forward_only=forward_only)
    finally:
        cap.close()
    return mbs, cap


def _assert_exact(replay, mbs, cap, calls_per_mb: int) -> None:
    """Every router call routed exactly the replayed ids of its micro-batch (forward calls in
    micro-batch order, then recompute calls in the same order)."""
    k = replay.geometry.top_k
    assert set(cap.calls) == set(replay.layers)
    for i, layer in enumerate(replay.layers):
        calls = cap.calls[layer]
        assert len(calls) == calls_per_mb * len(mbs)
        for c, rm in enumerate(calls):
            mb = mbs[c % len(mbs)] if calls_per_mb == 1 else mbs[c // calls_per_mb]
            np.testing.assert_array_equal(S.routing_map_ids(rm, k), _expected(mb, i))


@pytest.mark.parametrize("packing", [Packing.bshd(12), Packing.thd(4)], ids=["bshd", "thd"])
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_every_router_routes_the_replayed_ids(packing, recompute, router):
    kw = dict(RECOMPUTE if recompute else {})
    kw.update(SIGMOID if router == "sigmoid_bias" else {})
    model = S.build_model(**kw)
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [7, 12, 5, 9], seed=3)
    replay = RoutingReplay(model, geo, packing=packing)
    mbs, cap = _run(model, replay, [samples[:2], samples[2:]], packing)
    # Forward of mb0, (recompute of mb0), forward of mb1, (recompute of mb1).
    for i, layer in enumerate(replay.layers):
        calls = cap.calls[layer]
        assert len(calls) == (4 if recompute else 2)
        order = [0, 0, 1, 1] if recompute else [0, 1]
        for rm, m in zip(calls, order):
            np.testing.assert_array_equal(
                S.routing_map_ids(rm, geo.top_k), _expected(mbs[m], i)
            )
    # Pad rows: distinct ids within a row and not one constant row.
    pads = mbs[0].host.ids[mbs[0].host.region == PAD]
    assert len(pads) > 1
    assert (np.sort(pads, -1)[..., 1:] != np.sort(pads, -1)[..., :-1]).all()
    assert len({r.tobytes() for r in pads[:, 0]}) > 1
    m = replay.metrics()
    data = sum(s.num_tokens - 1 for s in samples)
    assert m["routing_replay/tokens"] == data * geo.num_moe_layers
    assert 0.0 <= m["routing_replay/exact"] <= m["routing_replay/overlap"] <= 1.0
    replay.close()


def test_leading_dense_layers_are_skipped():
    model = S.build_model(moe_layer_freq=[0, 0, 1, 1], **RECOMPUTE)
    geo = model_geometry(model.config)
    assert geo.moe_layers == (2, 3)
    samples = S.make_samples(geo, [6, 9], seed=5)
    replay = RoutingReplay(model, geo, packing=Packing.thd(2))
    assert replay.layers == (2, 3)
    mbs, cap = _run(model, replay, [samples], Packing.thd(2))
    _assert_exact(replay, mbs, cap, calls_per_mb=2)


def _own_routing_as_rollout(lengths, prompt_lens, seed):
    """A model, its replay (bshd, 10 tokens) and samples whose rollout routing is the model's
    own native routing of them (one forward pass, replay off)."""
    model = S.build_model()
    geo = model_geometry(model.config)
    packing = Packing.bshd(10)
    samples = S.make_samples(geo, lengths, prompt_lens=prompt_lens, seed=seed)
    replay = RoutingReplay(model, geo, packing=packing)
    cap = S.RoutingCapture(model)
    b = len(samples)
    S.run_pass(model, replay, [S.batch_inputs(samples, packing)], 1, 10, b, forward_only=True)
    cap.close()
    # Native maps [s*b, E] in sequence-major order -> per-sample rows [pos, layer, k].
    for i, layer in enumerate(replay.layers):
        ids = S.routing_map_ids(cap.calls[layer][0], geo.top_k).reshape(10, b, geo.top_k)
        for j, s in enumerate(samples):
            s.routed[:, i, :] = ids[: s.num_tokens - 1, j, :]
    return model, replay, samples, packing


def test_agreement_is_one_when_replaying_the_models_own_routing():
    """Record the model's native routing, store it as rollout routing, replay it: the
    router's own top-k equals the replayed set for 100% of (token, layer) blocks."""
    model, replay, samples, packing = _own_routing_as_rollout([10, 8], [4, 3], seed=7)
    geo = replay.geometry
    _run(model, replay, [samples], packing, forward_only=True)
    m = replay.metrics()
    assert m["routing_replay/exact"] == 1.0 and m["routing_replay/overlap"] == 1.0
    assert m["routing_replay/prompt/exact"] == 1.0 and m["routing_replay/completion/exact"] == 1.0
    assert m["routing_replay/prompt/tokens"] == (4 + 3) * geo.num_moe_layers


def test_stale_prompt_routing_shows_in_the_prompt_region():
    model, replay, samples, packing = _own_routing_as_rollout([10, 10], [5, 5], seed=8)
    for s in samples:
        # an engine that returned stale prompt rows: shift experts by one in the prompt
        s.routed[:5] = (s.routed[:5] + 1) % replay.geometry.num_experts
    _run(model, replay, [samples], packing, forward_only=True)
    m = replay.metrics()
    assert m["routing_replay/completion/exact"] == 1.0
    assert m["routing_replay/prompt/exact"] < 0.5


def test_replay_off_gives_native_routing_and_passes_leave_no_state():
    """Native maps from a model without replay == maps of the replay-enabled twin outside a
    pass, before and after a log-prob pass and a training pass."""
    packing = Packing.thd(2)
    ref = S.build_model(seed=11, moe_enable_routing_replay=False, **RECOMPUTE)
    geo = model_geometry(ref.config)
    samples = S.make_samples(geo, [8, 6], seed=2)
    batch = [S.batch_inputs(samples, packing)]
    cap = S.RoutingCapture(ref)
    S.run_pass(ref, None, batch, 1, 16, 1, forward_only=True)
    cap.close()
    native = {l: S.routing_map_ids(v[0], geo.top_k) for l, v in cap.calls.items()}

    model = S.build_model(seed=11, **RECOMPUTE)
    replay = RoutingReplay(model, geo, packing=packing)

    def native_now():
        c = S.RoutingCapture(model)
        S.run_pass(model, replay, batch, 1, 16, 1, forward_only=True)
        c.close()
        return {l: S.routing_map_ids(v[0], geo.top_k) for l, v in c.calls.items()}

    def assert_clean():
        for mod in model.modules():
            rr = getattr(mod, "router_replay", None)
            if rr is not None:
                assert rr.target_topk_idx is None
                assert rr.replay_backward_list == []
                assert rr.router_replay_action is None

    for l in native:
        np.testing.assert_array_equal(native_now()[l], native[l])
    # Log-prob pass with rollout A, then training pass with rollout B.
    a = S.make_samples(geo, [8, 6], seed=20)
    b = S.make_samples(geo, [8, 6], seed=21)
    mbs_a, cap_a = _run(model, replay, [a], packing, forward_only=True)
    _assert_exact(replay, mbs_a, cap_a, calls_per_mb=1)
    assert_clean()
    mbs_b, cap_b = _run(model, replay, [b], packing)
    _assert_exact(replay, mbs_b, cap_b, calls_per_mb=2)
    assert_clean()
    after = native_now()
    for l in native:
        np.testing.assert_array_equal(after[l], native[l])
    replay.close()
    assert all("get_replay_topk" not in vars(s.replay) for s in replay._slots)


def test_several_micro_batches_with_recompute_replay_each_their_own():
    model = S.build_model(**RECOMPUTE)
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [5, 6, 7, 8, 4, 9], seed=4)
    replay = RoutingReplay(model, geo, packing=Packing.bshd(9))
    groups = [samples[0:2], samples[2:4], samples[4:6]]
    mbs, cap = _run(model, replay, groups, Packing.bshd(9))
    _assert_exact(replay, mbs, cap, calls_per_mb=2)


def test_mtp_routers_are_not_replay_targets():
    """Decoder routers replay; the multi-token-prediction router (no rollout routing) keeps
    routing natively and is never given targets."""
    model = S.build_model(mtp=True, mtp_num_layers=1)
    geo = model_geometry(model.config)
    packing = Packing.bshd(8)
    replay = RoutingReplay(model, geo, packing=packing)
    assert replay.layers == geo.moe_layers
    assert not any("mtp" in r for r in replay.routers)
    mtp_router = next(m for n, m in model.named_modules() if n.startswith("mtp.") and
                      n.endswith(".router"))
    seen_actions = []
    mtp_router.register_forward_hook(
        lambda *a: seen_actions.append(mtp_router.router_replay.router_replay_action))
    samples = S.make_samples(geo, [8, 6], seed=1)
    b = S.batch_inputs(samples, packing)
    mb = replay.prepare(samples)
    cap = S.RoutingCapture(model)

    def forward_step(it, model):
        return model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["tokens"]), None

    with replay.replaying([mb], forward_only=True):
        replay.wrap_forward_step(forward_step)(None, model)
    cap.close()
    assert seen_actions == [None]
    assert mtp_router.router_replay.target_topk_idx is None
    for i, layer in enumerate(replay.layers):
        np.testing.assert_array_equal(
            S.routing_map_ids(cap.calls[layer][0], geo.top_k), _expected(mb, i))
    replay.close()


def test_ids_reach_the_device_narrow_and_widen_there():
    model = S.build_model()
    geo = model_geometry(model.config)
    replay = RoutingReplay(model, geo, packing=Packing.thd(1))
    samples = S.make_samples(geo, [6], seed=1)
    mb = replay.prepare(samples)
    assert mb.host.ids.dtype == np.uint8
    assert mb.ids.dtype == torch.int64 and mb.ids.is_contiguous()
    assert mb.targets[0].shape == (6, geo.top_k)
    np.testing.assert_array_equal(mb.targets[1].numpy(), mb.host.ids[:, 1, :])
    replay.close()


SELECTIVE_MOE = dict(recompute_granularity="selective", recompute_modules=["moe"])


@pytest.mark.parametrize("recompute", [None, RECOMPUTE, SELECTIVE_MOE],
                         ids=["plain", "full_recompute", "selective_moe_recompute"])
def test_micro_batches_in_flight_replay_their_own_ids_in_backward(recompute):
    """As under a pipeline schedule: forwards of mb0, mb1, mb2, then their backwards. Recompute
    in backward must see each micro-batch's own ids (megatron's backward FIFO), and without
    recompute the queue must not grow past the micro-batches in flight."""
    model = S.build_model(**(recompute or {}))
    geo = model_geometry(model.config)
    packing = Packing.thd(2)
    groups = [S.make_samples(geo, [5 + i, 7], seed=30 + i, prefix=f"m{i}-") for i in range(3)]
    replay = RoutingReplay(model, geo, packing=packing)
    mbs = [replay.prepare(g) for g in groups]
    batches = iter([S.batch_inputs(g, packing) for g in groups])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], b["position_ids"], b["attention_mask"]), None

    fwd = replay.wrap_forward_step(forward_step)
    cap = S.RoutingCapture(model)
    with replay.replaying(mbs):
        outs = [fwd(batches, model)[0] for _ in mbs]
        for o in outs:
            o.float().pow(2).mean().backward()
            assert max(len(s.replay.replay_backward_list) for s in replay._slots) <= len(mbs)
    cap.close()
    order = [0, 1, 2, 0, 1, 2] if recompute else [0, 1, 2]
    for i, layer in enumerate(replay.layers):
        assert len(cap.calls[layer]) == len(order)
        for rm, m in zip(cap.calls[layer], order):
            np.testing.assert_array_equal(S.routing_map_ids(rm, geo.top_k), _expected(mbs[m], i))


def test_allgather_dispatcher_replays_too():
    model = S.build_model(moe_token_dispatcher_type="allgather", **RECOMPUTE)
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [6, 9, 4], seed=12)
    replay = RoutingReplay(model, geo, packing=Packing.thd(2))
    mbs, cap = _run(model, replay, [samples[:2], samples[2:]], Packing.thd(2))
    _assert_exact(replay, mbs, cap, calls_per_mb=2)
    replay.close()
