"""Native rows under replay (CPU, real megatron-core models): rows before ``routed_start`` route
exactly as with replay off (the same experts, bit for bit); rows marked native route with the
router's own top-k of that run; every other data row routes to its stored ids; with activation
recompute, in bshd and THD, with micro-batches with and without native rows in one pass.

What the routers routed is read by forward hooks on the routers (their routing map and probs),
and their own routing is recomputed there from their input by megatron's routing function with
replay off: never through the replay hook's code. At native rows the probs equal that own
routing bit for bit; against the replay-off run they agree to float rounding only, because an
expert's matmul over a different set of tokens (the replayed rows route elsewhere) may round
differently on a CPU BLAS (one token takes a matrix-vector kernel), which changes the hidden
states by an ulp, never the experts chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.trainer_hooks.megatron import support as S
from trainer_hooks.megatron import (
    NATIVE,
    PAD,
    Packing,
    RoutingReplay,
    model_geometry,
    moe_routers,
)
from trainer_hooks.megatron._replay import _upload

pytestmark = pytest.mark.usefixtures("megatron_cpu")

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SIGMOID = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_topk_scaling_factor=2.5)
PACKINGS = [Packing.bshd(12), Packing.thd(4)]


class RouterCalls:
    """Every router call by wire layer: ``(map, probs, own_map, own_probs)``, where ``map`` and
    ``probs`` are what the router returned and ``own_*`` is megatron's routing of the same
    logits with replay off (the router's own top-k in that run)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._handles = [r.module.register_forward_hook(self._hook(r.layer))
                         for r in moe_routers(model)]

    def _hook(self, layer: int):
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        def hook(mod: Any, inp: Any, out: Any) -> None:
            cfg = mod.config
            with torch.no_grad():
                logits = mod.gating(inp[0]).view(-1, cfg.num_moe_experts)
                own_probs, own_map = topk_routing_with_score_function(
                    logits, mod.topk, use_pre_softmax=cfg.moe_router_pre_softmax,
                    num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
                    scaling_factor=cfg.moe_router_topk_scaling_factor,
                    score_function=mod.score_function, expert_bias=mod.expert_bias,
                )
            self.calls.setdefault(layer, []).append(
                (out[1].detach().clone(), out[0].detach().clone(), own_map, own_probs))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def with_native(samples, starts=(), marks=None):
    """Cut ``samples`` to start their routing at ``starts[i]`` (rows before it dropped) and mark
    rows ``marks[i]`` (routing-row indices) native; stored ids at marked rows are zeroed, as an
    accepted sample holds them."""
    for i, s in enumerate(samples):
        r = starts[i] if i < len(starts) else 0
        s.routed, s.routed_start = s.routed[r:].copy(), r
        rows = (marks or {}).get(i)
        if rows:
            s.native = np.zeros(s.rows, bool)
            s.native[list(rows)] = True
            s.routed[s.native] = 0
    return samples


def token_rows(samples, packing: Packing) -> list[np.ndarray]:
    """Router token index of each position of each sample (bshd sequence-major, THD packed),
    computed here, not by the layout."""
    b = len(samples)
    if packing.format == "bshd":
        return [np.arange(s.num_tokens) * b + j for j, s in enumerate(samples)]
    m = packing.pad_multiple
    padded = [-(-s.num_tokens // m) * m for s in samples]
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    return [starts[j] + np.arange(s.num_tokens) for j, s in enumerate(samples)]


def positions(s) -> dict[str, np.ndarray]:
    marked = s.routed_start + (np.flatnonzero(s.native) if s.native is not None else
                               np.empty(0, np.int64))
    stored = np.setdiff1d(np.arange(s.routed_start, s.num_tokens - 1), marked)
    return {"before": np.arange(s.routed_start), "marked": marked, "stored": stored}


def ids_of(routing_map: torch.Tensor, k: int) -> np.ndarray:
    return S.routing_map_ids(routing_map, k)


def native_off(model, groups, packing) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """Every router call of a forward pass over ``groups`` with replay off."""
    cap = RouterCalls(model)
    batches = [S.batch_inputs(g, packing) for g in groups]
    S.run_pass(model, None, batches, len(groups), batches[0]["tokens"].shape[1],
               batches[0]["tokens"].shape[0], forward_only=True)
    cap.close()
    return cap.calls


def replayed(model, replay, groups, packing, mbs=None, forward_only=False):
    mbs = mbs if mbs is not None else [replay.prepare(g) for g in groups]
    batches = [S.batch_inputs(g, packing) for g in groups]
    cap = RouterCalls(model)
    try:
        with replay.replaying(mbs, forward_only=forward_only):
            S.run_pass(model, replay, batches, len(groups), batches[0]["tokens"].shape[1],
                       batches[0]["tokens"].shape[0], forward_only=forward_only)
    finally:
        cap.close()
    return mbs, cap.calls


def mismatches(geo, layers, groups, packing, calls, off, calls_per_mb) -> dict[str, int]:
    """Rows, over every router call, where: a row before ``routed_start`` differs from replay
    off (routing map bitwise, probs beyond float rounding) or from the router's own routing of
    that call (map or probs, bitwise); a marked row differs from the router's own routing of
    that call (map or probs, bitwise); a stored row's experts differ from the stored ids. Also
    counts the rows checked."""
    k = geo.top_k
    out = dict.fromkeys(("before", "before_checked", "marked", "marked_checked", "stored",
                         "stored_checked"), 0)
    for li, layer in enumerate(layers):
        for c, (rmap, probs, own_map, own_probs) in enumerate(calls[layer]):
            m = c // calls_per_mb
            rmap_off, probs_off = off[layer][m][:2]
            got = ids_of(rmap, k)
            for s, rows in zip(groups[m], token_rows(groups[m], packing)):
                pos = positions(s)
                r = rows[pos["before"]]
                out["before_checked"] += r.size
                close = torch.isclose(probs[r], probs_off[r], rtol=1e-5, atol=1e-7)
                out["before"] += int((~(rmap[r] == rmap_off[r]).all(1) | ~close.all(1)
                                      | ~(rmap[r] == own_map[r]).all(1)
                                      | ~(probs[r] == own_probs[r]).all(1)).sum())
                r = rows[pos["marked"]]
                out["marked_checked"] += r.size
                out["marked"] += int((~(rmap[r] == own_map[r]).all(1)
                                      | ~(probs[r] == own_probs[r]).all(1)).sum())
                r = rows[pos["stored"]]
                want = np.sort(s.routed[pos["stored"] - s.routed_start, li].astype(np.int64), -1)
                out["stored_checked"] += r.size
                out["stored"] += int((got[r] != want).any(-1).sum())
    return out


def _assert_native_and_exact(bad: dict[str, int]) -> None:
    assert bad["before_checked"] > 0 and bad["stored_checked"] > 0, bad
    assert bad["before"] == bad["marked"] == bad["stored"] == 0, bad


@pytest.mark.parametrize("packing", PACKINGS, ids=["bshd", "thd"])
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_native_rows_route_as_with_replay_off_and_the_rest_replays(packing, recompute, router):
    kw = dict(RECOMPUTE if recompute else {})
    kw.update(SIGMOID if router == "sigmoid_bias" else {})
    model = S.build_model(seed=5, **kw)
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [9, 12, 7, 11], prompt_lens=[6, 5, 3, 4], seed=6)
    groups = [with_native(samples[:2], starts=(4, 0), marks={1: (6, 8)}),
              with_native(samples[2:], starts=(0, 3), marks={0: (3,)})]
    off = native_off(model, groups, packing)
    replay = RoutingReplay(model, geo, packing=packing)
    mbs, calls = replayed(model, replay, groups, packing)
    assert all(mb.has_native for mb in mbs)
    bad = mismatches(geo, replay.layers, groups, packing, calls, off, 2 if recompute else 1)
    _assert_native_and_exact(bad)
    assert bad["marked_checked"] > 0
    m = replay.metrics()
    native_rows = sum(s.routed_start + s.native_rows for s in samples)
    assert m["routing_replay/native/tokens"] == native_rows * geo.num_moe_layers
    stored = sum(s.num_tokens - 1 for s in samples) - native_rows
    assert m["routing_replay/tokens"] == stored * geo.num_moe_layers
    replay.close()


@pytest.mark.parametrize("packing", PACKINGS, ids=["bshd", "thd"])
def test_replaying_pad_ids_at_native_rows_would_be_caught(packing):
    """The control: the same micro-batches with their native rows turned into pad rows (pad
    ids replayed, as megatron's RouterReplay alone would do) fail the comparison with replay
    off, so the test above can fail."""
    model = S.build_model(seed=5)
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [9, 12, 7, 11], prompt_lens=[6, 5, 3, 4], seed=6)
    groups = [with_native(samples[:2], starts=(4, 0), marks={1: (6, 8)}),
              with_native(samples[2:], starts=(0, 3), marks={0: (3,)})]
    off = native_off(model, groups, packing)
    replay = RoutingReplay(model, geo, packing=packing)
    mbs = []
    for g in groups:
        host = replay.layout(g)
        host.region = np.where(host.region == NATIVE, PAD, host.region).astype(np.int8)
        mbs.append(_upload(host, torch.device("cpu")))
    assert not any(mb.has_native for mb in mbs)
    _, calls = replayed(model, replay, groups, packing, mbs=mbs, forward_only=True)
    bad = mismatches(geo, replay.layers, groups, packing, calls, off, 1)
    assert bad["before"] > bad["before_checked"] // 2, bad
    assert bad["marked"] > 0, bad
    replay.close()


@pytest.mark.parametrize("packing", PACKINGS, ids=["bshd", "thd"])
def test_micro_batches_with_and_without_native_rows_in_one_pass(packing):
    """Megatron's schedule (forward then backward per micro-batch, full recompute): the middle
    micro-batch has native rows, the others replay every row through megatron's own path."""
    model = S.build_model(seed=7, **RECOMPUTE)
    geo = model_geometry(model.config)
    groups = [S.make_samples(geo, [8, 11], seed=40 + i, prefix=f"m{i}-") for i in range(3)]
    with_native(groups[1], starts=(3, 2), marks={0: (2,), 1: (5, 6)})
    off = native_off(model, groups, packing)
    replay = RoutingReplay(model, geo, packing=packing)
    mbs, calls = replayed(model, replay, groups, packing)
    assert [mb.has_native for mb in mbs] == [False, True, False]
    bad = mismatches(geo, replay.layers, groups, packing, calls, off, 2)
    _assert_native_and_exact(bad)
    assert bad["stored_checked"] == 2 * geo.num_moe_layers * sum(
        s.num_tokens - 1 - s.routed_start - s.native_rows for g in groups for s in g)
    replay.close()


@pytest.mark.parametrize("recompute", [None, RECOMPUTE], ids=["plain", "full_recompute"])
def test_native_rows_under_micro_batches_in_flight(recompute):
    """As under a pipeline schedule: forwards of mb0, mb1, mb2, then their backwards; mb0 and
    mb2 have native rows, mb1 has none. Recompute pops each micro-batch's own targets, native
    rows route natively again there."""
    packing = Packing.thd(2)
    model = S.build_model(seed=9, **(recompute or {}))
    geo = model_geometry(model.config)
    groups = [S.make_samples(geo, [7 + i, 9], seed=50 + i, prefix=f"f{i}-") for i in range(3)]
    with_native(groups[0], starts=(2, 0), marks={1: (4,)})
    with_native(groups[2], starts=(0, 5))
    off = native_off(model, groups, packing)
    replay = RoutingReplay(model, geo, packing=packing)
    mbs = [replay.prepare(g) for g in groups]
    assert [mb.has_native for mb in mbs] == [True, False, True]
    batches = iter([S.batch_inputs(g, packing) for g in groups])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], b["position_ids"], b["attention_mask"]), None

    fwd = replay.wrap_forward_step(forward_step)
    cap = RouterCalls(model)
    with replay.replaying(mbs):
        outs = [fwd(batches, model)[0] for _ in mbs]
        for mb, o in zip(mbs, outs):
            o.float().pow(2).mean().backward()
            assert max(len(s.replay.replay_backward_list) for s in replay._slots) <= len(mbs)
            if recompute:  # each router's recompute took this micro-batch's targets off
                assert not any(x is mb.targets[s.local_index] for s in replay._slots
                               for x in s.replay.replay_backward_list)
    cap.close()
    order = [0, 1, 2, 0, 1, 2] if recompute else [0, 1, 2]
    # Reorder each layer's calls by micro-batch so that call c belongs to c // per_mb.
    per_mb = len(order) // 3
    calls = {l: [v[i] for i in np.argsort(order, kind="stable")] for l, v in cap.calls.items()}
    bad = mismatches(geo, replay.layers, groups, packing, calls, off, per_mb)
    _assert_native_and_exact(bad)
    replay.close()


def test_agreement_is_one_on_replayed_rows_and_native_rows_count_apart():
    """The model's own routing stored as rollout routing, with some rows cut (routed_start) or
    marked native: every replayed block agrees, native blocks are counted apart."""
    model = S.build_model(seed=3)
    geo = model_geometry(model.config)
    packing = Packing.bshd(10)
    samples = S.make_samples(geo, [10, 8, 9], prompt_lens=[4, 3, 5], seed=8)
    off = native_off(model, [samples], packing)
    for s, rows in zip(samples, token_rows(samples, packing)):
        for li, layer in enumerate(model_geometry(model.config).moe_layers):
            s.routed[:, li] = ids_of(off[layer][0][0], geo.top_k)[rows[:-1]]
    with_native(samples, starts=(3, 0, 2), marks={1: (4, 5)})
    replay = RoutingReplay(model, geo, packing=packing)
    replayed(model, replay, [samples], packing, forward_only=True)
    m = replay.metrics()
    native_rows = 3 + 2 + 2
    assert m["routing_replay/native/tokens"] == native_rows * geo.num_moe_layers
    assert m["routing_replay/tokens"] == (9 + 7 + 8 - native_rows) * geo.num_moe_layers
    assert m["routing_replay/exact"] == 1.0 and m["routing_replay/overlap"] == 1.0
    assert m["routing_replay/prompt/exact"] == m["routing_replay/completion/exact"] == 1.0
    replay.close()


def test_targets_hold_minus_one_at_native_tokens_only():
    model = S.build_model()
    geo = model_geometry(model.config)
    replay = RoutingReplay(model, geo, packing=Packing.thd(2))
    samples = with_native(S.make_samples(geo, [7, 6], seed=2), starts=(2,), marks={1: (1,)})
    mb = replay.prepare(samples)
    native = mb.host.native
    assert mb.has_native and native.sum() == 3
    for i, t in enumerate(mb.targets):
        assert (t[torch.from_numpy(native)] == -1).all()
        np.testing.assert_array_equal(t[torch.from_numpy(~native)].numpy(),
                                      mb.host.ids[~native, i, :])
    plain = replay.prepare(S.make_samples(geo, [7, 6], seed=2))
    assert not plain.has_native and (plain.ids >= 0).all()
    replay.close()
