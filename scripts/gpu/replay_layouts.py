"""Multi-rank verification of the router replay hook: every parallel layout, every router.

Run under torchrun, one process a GPU (NCCL), or on CPUs over gloo (``--cpu``, used by the CPU
test suite with world size 2)::

    torchrun --nproc-per-node 2 scripts/gpu/replay_layouts.py --out results.json
    python -m torch.distributed.run --nproc-per-node 2 scripts/gpu/replay_layouts.py --cpu

For each layout (TP2 + sequence parallel, CP2, PP2 with virtual pipeline, EP2 with the
all-to-all dispatcher, TP2 + SP + EP2 together, EP2 with a DeepSeek-style sigmoid router with
expert bias; each with THD packing and full activation recompute, TP2 and CP2 also bshd) it
builds a megatron-core GPTModel, runs a training pass of several micro-batches through
Megatron's own schedule with replay on, and captures every router call's routing map, and the
router's own routing of the same logits (megatron's routing function with replay off). Every
other micro-batch holds native rows (rows before ``routed_start``, and a completion row marked
native), so native and fully replayed micro-batches share a pass. Checks per router call, per
rank and layer:

- ``replayed``: the routing map equals what this rank's router was told: the ids it was given,
  its own top-k at native rows (all rows);
- ``reference``: at every token with rollout routing, the routing map equals the sample's
  stored row, where the token is identified independently: a global token index tensor laid out
  like the inputs and cut with megatron-core's own functions (``get_batch_on_this_cp_rank``,
  ``scatter_to_sequence_parallel_region``) or, for THD with CP, per sequence;
- ``native``: at every native token (identified the same way) the routing map equals the
  router's own top-k of that call, and at every token before ``routed_start`` it equals the
  routing of a forward pass over the same micro-batches with replay off.

Megatron-core's local attention (no Transformer Engine) refuses context parallelism, so the CP
layout runs with a per-token stand-in for core attention; the routers' token layout, which is
what replay depends on, is megatron's. THD packing runs as one row with a block-diagonal mask.
Its torch norm refuses sequence parallel, so the SP layouts use a LayerNorm marked for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from trainer_hooks.megatron import Packing, RoutingReplay, model_geometry, moe_routers
from trainer_hooks.megatron.steps import make_forward_step

VOCAB = 128

LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2_sp_thd": dict(tp=2, sp=True, packing="thd"),
    "tp2_sp_bshd": dict(tp=2, sp=True, packing="bshd"),
    "cp2_thd": dict(cp=2, packing="thd", standin_attention=True),
    "cp2_bshd": dict(cp=2, packing="bshd", standin_attention=True),
    "pp2_vpp2_thd": dict(pp=2, vpp=2, packing="thd", num_layers=8, dense_first=True),
    "ep2_alltoall_thd": dict(ep=2, packing="thd"),
    "tp2_sp_ep2_thd": dict(tp=2, sp=True, ep=2, etp=1, packing="thd"),
    "ep2_sigmoid_bias_thd": dict(ep=2, packing="thd", router="sigmoid"),
}


class PerTokenAttention(torch.nn.Module):
    """Stand-in core attention: each token's output is its own value vector."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        rep = query.shape[2] // value.shape[2]
        v = value.repeat_interleave(rep, dim=2) if rep > 1 else value
        return v.reshape(v.shape[0], v.shape[1], -1)


class SequenceParallelNorm(torch.nn.LayerNorm):
    """LayerNorm usable with sequence parallel (megatron-core's torch norm refuses it without
    Transformer Engine or Apex): its weights are marked for sequence-parallel grad reduction."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


def build_chunks(lay: dict[str, Any], device: torch.device) -> tuple[list[Any], Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.transformer_config import TransformerConfig

    RouterReplay.clear_global_router_replay_instances()
    n_layers = lay.get("num_layers", 4)
    freq = [0] + [1] * (n_layers - 1) if lay.get("dense_first") else 1
    config = TransformerConfig(
        num_layers=n_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=8, moe_router_topk=2, moe_layer_freq=freq,
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, moe_enable_routing_replay=True,
        moe_token_dispatcher_type="alltoall", params_dtype=torch.float32,
        pipeline_dtype=torch.float32, moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=lay.get("tp", 1), sequence_parallel=lay.get("sp", False),
        context_parallel_size=lay.get("cp", 1), pipeline_model_parallel_size=lay.get("pp", 1),
        virtual_pipeline_model_parallel_size=lay.get("vpp"),
        expert_model_parallel_size=lay.get("ep", 1),
        expert_tensor_parallel_size=lay.get("etp"),
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
        # Individual isend/irecv (as Megatron-LM's interleaved schedule uses them): with two
        # pipeline ranks, batch_isend_irecv pairs one stage's gradient send with the other's
        # activation receive (both go to the same peer), so a stage computed on gradients.
        batch_p2p_comm=False,
        **(dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_topk_scaling_factor=2.5) if lay.get("router") == "sigmoid" else {}),
    )
    torch.manual_seed(1234)
    chunks = []
    for vp in range(lay.get("vpp") or 1):
        vp_stage = vp if lay.get("vpp") else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)
        if lay.get("standin_attention"):
            for ls in spec.layer_specs:
                ls.submodules.self_attention.submodules.core_attention = PerTokenAttention
        if lay.get("sp"):
            for ls in spec.layer_specs:
                ls.submodules.input_layernorm = SequenceParallelNorm
                ls.submodules.pre_mlp_layernorm = SequenceParallelNorm
            spec.layer_norm = SequenceParallelNorm
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        m = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=1024, position_embedding_type="rope",
                     pre_process=pre, post_process=post, vp_stage=vp_stage)
        chunks.append(m.to(device))
    return chunks, config


def random_sample(geo: RoutingGeometry, n: int, rng: np.random.Generator,
                  sample_id: str, native: bool = False) -> RoutedSample:
    """``n`` random tokens, a third of them prompt, with random distinct top-k ids per row.
    ``native`` (when the sample has 6 tokens or more): routing from the prompt's last token on
    and the middle completion row marked native (its stored ids zero, as accepted)."""
    plen = max(1, n // 3)
    start, marks = 0, None
    if native and n >= 6:
        start = max(1, plen - 1)
        marks = np.zeros(n - 1 - start, bool)
        marks[plen + (n - 1 - plen) // 2 - start] = True
    keys = rng.random((n - 1 - start, geo.num_moe_layers, geo.num_experts))
    routed = np.argsort(keys, -1)[..., : geo.top_k].astype(geo.id_dtype)
    if marks is not None:
        routed[marks] = 0
    return RoutedSample(sample_id=sample_id, tokens=rng.integers(0, VOCAB, n).astype(np.int32),
                        prompt_len=plen, routed_start=start, native=marks, routed=routed)


def make_micro_batches(geo: RoutingGeometry, n_mb: int, total: int, multiple: int,
                       rng: np.random.Generator, tag: str) -> list[list[RoutedSample]]:
    """Micro-batches of samples whose padded lengths sum to ``total`` (fixed pipeline shapes);
    the first two samples of every other micro-batch have native rows."""
    out = []
    for m in range(n_mb):
        units = total // multiple
        cuts = np.sort(rng.choice(np.arange(1, units), size=min(3, units - 1), replace=False))
        parts = np.diff(np.concatenate(([0], cuts, [units]))) * multiple
        samples = []
        for j, p in enumerate(parts):
            n = int(p - rng.integers(0, min(multiple, p - 1)))
            samples.append(random_sample(geo, n, rng, f"{tag}-mb{m}-{j}", m % 2 == 0 and j < 2))
        out.append(samples)
    return out


def global_inputs(samples: list[RoutedSample], packing: Packing) -> dict[str, torch.Tensor]:
    """Inputs over the global (pre-CP) token axis, plus ``gid``: each slot's global index."""
    n = np.array([s.num_tokens for s in samples])
    if packing.format == "bshd":
        s_len = packing.seq_length
        tok = np.zeros((len(samples), s_len), np.int64)
        for i, s in enumerate(samples):
            tok[i, : s.num_tokens] = s.tokens
        gid = np.arange(len(samples) * s_len).reshape(len(samples), s_len)
        pos = np.broadcast_to(np.arange(s_len), tok.shape).copy()
        seq = np.broadcast_to(np.arange(len(samples))[:, None], tok.shape).copy()
        return dict(tokens=tok, pos=pos, gid=gid, seq=seq)
    padded = packing.padded_lengths(n)
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    total = int(padded.sum())
    tok = np.zeros(total, np.int64)
    for i, s in enumerate(samples):
        tok[starts[i] : starts[i] + s.num_tokens] = s.tokens
    seq = np.repeat(np.arange(len(samples)), padded)
    pos = np.arange(total) - starts[seq]
    return dict(tokens=tok[None], pos=pos[None], gid=np.arange(total)[None], seq=seq[None])


def cp_slice(inp: dict[str, np.ndarray], packing: Packing, samples: list[RoutedSample],
             cp: int, cp_rank: int) -> dict[str, np.ndarray]:
    """The trainer's context-parallel cut of its inputs."""
    if cp == 1:
        return inp
    if packing.format == "bshd":
        from megatron.core.utils import get_batch_on_this_cp_rank

        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inp.items()}
        return {k: v.numpy() for k, v in get_batch_on_this_cp_rank(t).items()}
    padded = packing.padded_lengths(np.array([s.num_tokens for s in samples]))
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    keep = []
    for st, p in zip(starts, padded):  # per sequence: chunks r and 2cp-1-r of 2cp
        c = p // (2 * cp)
        keep += [np.arange(st + cp_rank * c, st + (cp_rank + 1) * c),
                 np.arange(st + (2 * cp - 1 - cp_rank) * c, st + (2 * cp - cp_rank) * c)]
    idx = np.concatenate(keep)
    return {k: v[:, idx] for k, v in inp.items()}


def block_mask(seq: np.ndarray, pos: np.ndarray) -> torch.Tensor:
    """``[1, 1, T, T]`` True-masked: attend within the same sequence, causally."""
    s, p = seq[0], pos[0]
    ok = (s[:, None] == s[None, :]) & (p[:, None] >= p[None, :])
    return torch.from_numpy(~ok)[None, None]


def router_gids(local: dict[str, np.ndarray], sp_tp: int, device: torch.device) -> np.ndarray:
    """Global index of each router row: sequence-major, then megatron's sequence-parallel cut."""
    g = torch.from_numpy(local["gid"]).T.contiguous()  # [s, b]
    if sp_tp > 1:
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        g = scatter_to_sequence_parallel_region(g.to(device).double().unsqueeze(-1)).squeeze(-1)
        g = g.long().cpu()
    return g.reshape(-1).numpy()


def expected_table(samples: list[RoutedSample], packing: Packing, geo: RoutingGeometry):
    """For each global index: the stored row (or -1 where the rollout has none, and at rows
    marked native); whether it routes natively (1: before ``routed_start``, 2: marked)."""
    inp = global_inputs(samples, packing)
    seq, pos = inp["seq"].reshape(-1), inp["pos"].reshape(-1)
    table = np.full((seq.size, geo.num_moe_layers, geo.top_k), -1, np.int64)
    native = np.zeros(seq.size, np.int8)
    for i, s in enumerate(samples):
        sel = (seq == i) & (pos < s.num_tokens - 1) & (pos >= s.routed_start)
        table[sel] = s.routed[pos[sel] - s.routed_start]
        native[(seq == i) & (pos < s.routed_start)] = 1
        if s.native is not None:
            marked = sel.copy()
            marked[sel] = s.native[pos[sel] - s.routed_start]
            table[marked] = -1
            native[marked] = 2
    return table, native


class Capture:
    """Every router call: whether grad was on (recompute), the routing map, and the router's own
    routing map of the same logits (megatron's routing function, replay off)."""

    def __init__(self, chunks: list[Any]) -> None:
        self.calls: dict[int, list[tuple[bool, torch.Tensor, torch.Tensor]]] = {}
        self.handles = [r.module.register_forward_hook(self._hook(r.layer))
                        for r in moe_routers(chunks)]

    def _hook(self, layer: int):
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        def hook(mod: Any, inp: Any, out: Any) -> None:
            cfg = mod.config
            with torch.no_grad():
                logits = mod.gating(inp[0]).view(-1, cfg.num_moe_experts)
                own = topk_routing_with_score_function(
                    logits, mod.topk, use_pre_softmax=cfg.moe_router_pre_softmax,
                    num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
                    scaling_factor=cfg.moe_router_topk_scaling_factor,
                    score_function=mod.score_function, expert_bias=mod.expert_bias)[1]
            self.calls.setdefault(layer, []).append(
                (torch.is_grad_enabled(), out[1].detach().cpu(), own.cpu()))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def map_ids(rm: torch.Tensor, k: int) -> np.ndarray:
    m = rm.numpy()
    ids = np.sort(np.argsort(~m, axis=-1, kind="stable")[:, :k], axis=-1)
    ids[m.sum(-1) != k] = -2  # a row not routed to exactly k experts never matches
    return ids


def run_layout(name: str, lay: dict[str, Any], device: torch.device, cpu: bool) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    world = dist.get_world_size()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=lay.get("tp", 1),
        pipeline_model_parallel_size=lay.get("pp", 1),
        virtual_pipeline_model_parallel_size=lay.get("vpp"),
        context_parallel_size=lay.get("cp", 1),
        expert_model_parallel_size=lay.get("ep", 1),
        expert_tensor_parallel_size=lay.get("etp"),
    )
    if not cpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    chunks, config = build_chunks(lay, device)
    geo = model_geometry(config)
    tp, cp = lay.get("tp", 1), lay.get("cp", 1)
    sp_tp = tp if lay.get("sp") else 1
    mult = 2 * cp * sp_tp if cp > 1 or sp_tp > 1 else 2
    n_mb, total = 4, 96
    if lay["packing"] == "bshd":
        packing = Packing.bshd(32)
    else:
        packing = Packing.thd(mult)
    # Same data on ranks that must agree (TP, CP, PP peers); own data per data-parallel rank.
    dp_rank = ps.get_data_parallel_rank()
    rng = np.random.default_rng(100 + dp_rank)
    if packing.format == "bshd":
        mbs_samples = [[random_sample(geo, int(rng.integers(6, 33)), rng, f"dp{dp_rank}-mb{m}-{j}",
                                      m % 2 == 0 and j < 2)
                        for j in range(3)] for m in range(n_mb)]
    else:
        mbs_samples = make_micro_batches(geo, n_mb, total, mult, rng, f"dp{dp_rank}")

    replay = RoutingReplay(chunks, geo, packing=packing)
    mbs = [replay.prepare(s) for s in mbs_samples]
    local_inputs, gids = [], []
    for s in mbs_samples:
        inp = cp_slice(global_inputs(s, packing), packing, s, cp, ps.get_context_parallel_rank())
        local_inputs.append(inp)
        gids.append(router_gids(inp, sp_tp, device))

    def batch_of(inp: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        mask = None
        if not lay.get("standin_attention"):
            if packing.format == "thd":
                mask = block_mask(inp["seq"], inp["pos"]).to(device)
            else:
                s_len = inp["tokens"].shape[1]
                mask = torch.triu(torch.ones(s_len, s_len, dtype=torch.bool, device=device), 1)[None, None]
        return dict(tokens=torch.from_numpy(inp["tokens"]).to(device),
                    position_ids=torch.from_numpy(inp["pos"]).to(device), attention_mask=mask)

    batches = [batch_of(i) for i in local_inputs]

    fwd = replay.wrap_forward_step(make_forward_step())  # mean(output ** 2) as the loss
    data = [iter(list(batches)) for _ in chunks] if len(chunks) > 1 else iter(list(batches))
    model_arg = chunks if len(chunks) > 1 else chunks[0]
    seq_length = batches[0]["tokens"].shape[1] * cp  # schedules divide by cp (and tp with SP)
    cap = Capture(chunks)
    t0 = time.perf_counter()
    with replay.replaying(mbs):
        get_forward_backward_func()(
            forward_step_func=fwd, data_iterator=data, model=model_arg, num_microbatches=n_mb,
            seq_length=seq_length, micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=False)
    elapsed = time.perf_counter() - t0
    cap.close()
    # The same micro-batches with replay off (forward only): what native rows must route to.
    cap_off = Capture(chunks)
    data = [iter(list(batches)) for _ in chunks] if len(chunks) > 1 else iter(list(batches))
    get_forward_backward_func()(
        forward_step_func=make_forward_step(), data_iterator=data, model=model_arg,
        num_microbatches=n_mb, seq_length=seq_length,
        micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True)
    cap_off.close()

    tables = [expected_table(s, packing, geo) for s in mbs_samples]
    per_layer: dict[str, Any] = {}
    problems: list[str] = []
    for li, layer in enumerate(replay.layers):
        calls = cap.calls.get(layer, [])
        fwd_calls = [(rm, own) for grad, rm, own in calls if not grad]
        rec_calls = [(rm, own) for grad, rm, own in calls if grad]
        off_calls = [rm for _, rm, _ in cap_off.calls.get(layer, [])]
        stat = dict(calls=len(calls), rows=0, rows_replayed=0, data_rows=0, data_rows_match=0,
                    native_rows=0, native_rows_own=0, native_rows_off=0, native_rows_off_match=0)
        if len(fwd_calls) != n_mb or len(rec_calls) != n_mb or len(off_calls) != n_mb:
            problems.append(f"layer {layer}: {len(fwd_calls)} forward, {len(rec_calls)} "
                            f"recompute and {len(off_calls)} replay-off router calls for {n_mb} "
                            "micro-batches")
        for m, (rm, own_rm) in list(enumerate(fwd_calls)) + list(enumerate(rec_calls)):
            if m >= n_mb:
                continue
            got, own = map_ids(rm, geo.top_k), map_ids(own_rm, geo.top_k)
            host = mbs[m].host
            want = np.sort(host.ids[:, li, :].astype(np.int64), -1)
            if got.shape == want.shape:
                want[host.native] = own[host.native]
                stat["rows_replayed"] += int((got == want).all(-1).sum())
            stat["rows"] += got.shape[0]
            table, native_of = tables[m]
            ref = table[gids[m], geo.moe_layers.index(layer)]
            native = native_of[gids[m]]
            has = ref[:, 0] >= 0
            stat["data_rows"] += int(has.sum())
            stat["native_rows"] += int((native > 0).sum())
            stat["native_rows_off"] += int((native == 1).sum())
            if got.shape[0] == ref.shape[0]:
                stat["data_rows_match"] += int((got[has] == np.sort(ref[has], -1)).all(-1).sum())
                nat = native > 0
                stat["native_rows_own"] += int((got[nat] == own[nat]).all(-1).sum())
            if m < len(off_calls) and got.shape[0] == ref.shape[0]:
                off, before = map_ids(off_calls[m], geo.top_k), native == 1
                stat["native_rows_off_match"] += int((got[before] == off[before]).all(-1).sum())
        stat["replayed_pct"] = 100.0 * stat["rows_replayed"] / max(stat["rows"], 1)
        stat["reference_pct"] = 100.0 * stat["data_rows_match"] / max(stat["data_rows"], 1)
        n_own, n_off = stat["native_rows"], stat["native_rows_off"]
        stat["native_own_pct"] = 100.0 * stat["native_rows_own"] / n_own if n_own else 100.0
        stat["native_off_pct"] = (100.0 * stat["native_rows_off_match"] / n_off
                                  if n_off else 100.0)
        per_layer[str(layer)] = stat
    metrics = replay.metrics()
    replay.close()
    rank_info = dict(
        rank=dist.get_rank(), world=world, tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(), dp_rank=dp_rank,
        layers=list(replay.layers), per_layer=per_layer, problems=problems,
        seconds=round(elapsed, 3), agreement_tokens=metrics.get("routing_replay/tokens", 0.0),
        agreement_native_tokens=metrics.get("routing_replay/native/tokens", 0.0))
    return rank_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="gloo on CPUs, with the CPU shims")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from trainer_hooks.megatron import cpu_compat

    if args.cpu:
        cpu_compat.apply()
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        cpu_compat.apply_te_gemm_fix()  # megatron-core 0.16.x without Transformer Engine
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    results: dict[str, Any] = {}
    ok = True
    for name in args.layouts.split(","):
        try:
            info = run_layout(name, LAYOUTS[name], device, args.cpu)
        except Exception as e:  # report and go on with the next layout
            import traceback

            info = dict(rank=dist.get_rank(), error=f"{type(e).__name__}: {e}",
                        trace=traceback.format_exc()[-3000:])
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, info)
        results[name] = gathered
        if dist.get_rank() == 0:
            for r in gathered:
                if "error" in r:
                    ok = False
                    print(f"{name} rank {r['rank']}: ERROR {r['error']}\n{r['trace']}", flush=True)
                    continue
                for layer, s in r["per_layer"].items():
                    good = (s["replayed_pct"] == 100.0 and s["reference_pct"] == 100.0
                            and s["native_own_pct"] == 100.0 and s["native_off_pct"] == 100.0)
                    ok &= good and not r["problems"]
                    print(f"{name:18s} rank {r['rank']} (tp{r['tp_rank']} cp{r['cp_rank']} "
                          f"pp{r['pp_rank']} ep{r['ep_rank']}) layer {layer}: calls {s['calls']}, "
                          f"rows {s['rows']}, replayed {s['replayed_pct']:.3f}%, reference "
                          f"{s['reference_pct']:.3f}% of {s['data_rows']} data rows, native "
                          f"{s['native_own_pct']:.3f}% own top-k of {s['native_rows']}, "
                          f"{s['native_off_pct']:.3f}% as replay off of {s['native_rows_off']}",
                          flush=True)
                for p in r["problems"]:
                    print(f"{name} rank {r['rank']}: PROBLEM {p}", flush=True)
    if dist.get_rank() == 0:
        summary = dict(ok=ok, world=dist.get_world_size(), backend=dist.get_backend(),
                       torch=torch.__version__, results=results)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
        print("ALL LAYOUTS EXACT" if ok else "SOME LAYOUT FAILED", flush=True)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok or rank != 0 else 1)


if __name__ == "__main__":
    main()
