"""Cost of the Hugging Face ``transformers`` routing replay hook on a training step.

A ``transformers`` Qwen3-MoE model built from ``Qwen3MoeConfig`` with random init (no
checkpoint; default: 8 layers, hidden 2048, 32 heads / 4 KV heads of 128, 64 experts top-8,
expert FFN 768, vocab 32768, one padded row of 4096 tokens, bf16, attention ``sdpa``, the
library's default experts implementation — ``grouped_mm`` where it can dispatch). A step is
forward + backward (cross-entropy on the input ids; no auxiliary loss; no optimizer step
unless ``--optimizer``), gradients set to None first.

The routing replayed is valid for every token: the model's own routing, recorded once with
replay off, perturbed so that replay really changes experts while every expert keeps exactly
its native token count per layer: a fraction ``--perturb`` of rows per layer is paired at
random and each pair exchanges one id (one the other row does not hold). Keeping the load
matters: the grouped expert GEMMs' time depends on how tokens spread over experts, and a
perturbation that moves load (``--perturb-mode random``: one id of a row replaced by a random
unused expert) times the experts' new load, not the hook. Arms, interleaved in rotating order every round after warm-up:

- ``off``: the same model with no ``RoutingReplay`` attached (closed before the step);
- ``on``: a ``RoutingReplay`` attached, the micro-batch laid out and uploaded (``prepare``)
  inside the timed step, the pass active over forward and backward, agreement counted;
- ``on_prelaid``: as ``on``, the micro-batch prepared before the step (a trainer that lays
  out ahead, e.g. in its data loader);
- ``on_no_agreement``: as ``on`` with ``measure=False``.

Per step: device time from CUDA events recorded on the stream before the step's first and
after its last operation (the GPU idle after a synchronize, so host gaps inside the step are
counted), and wall clock. Medians per arm, the median of the per-round ratio to ``off``, and
the 10th–90th percentiles. On CUDA also: the sum of kernel and copy time per step from
``torch.profiler`` (median of 3 steps per arm), the ops whose device time grows most with
replay, and host syncs per step (``torch.cuda.set_sync_debug_mode``).

    python scripts/gpu/hf_replay_overhead.py --json out.json                 # one GPU
    python scripts/gpu/hf_replay_overhead.py --device cpu --tiny --json o.json  # logic check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from arm_timing import host_syncs, interleaved_rounds

ARMS = ("off", "on", "on_prelaid", "on_no_agreement")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a small model, few steps (logic check)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=768, help="expert FFN (moe_intermediate_size)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=4096, help="tokens per row")
    ap.add_argument("--batch", type=int, default=1, help="rows (one sample each)")
    ap.add_argument("--packing", choices=("padded", "packed"), default="padded",
                    help="padded: one sample per row, attention mask; packed: --pack-seqs "
                         "sequences per row, position_ids restarting at 0")
    ap.add_argument("--pack-seqs", type=int, default=4)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--attn", default="sdpa", help="attention implementation")
    ap.add_argument("--experts-impl", default=None,
                    help="experts implementation (default: the library's choice)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--optimizer", action="store_true", help="add an AdamW step to each step")
    ap.add_argument("--perturb", type=float, default=0.1,
                    help="fraction of rows per layer with one replayed id changed")
    ap.add_argument("--perturb-mode", choices=("swap", "random"), default="swap",
                    help="swap: pairs of rows exchange one id (per-expert load kept); random: "
                         "one id replaced by a random expert the row does not use")
    ap.add_argument("--steps", type=int, default=40, help="timed rounds (one step per arm)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up rounds")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps per arm (CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here too")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim = 2, 64, 4, 2, 16
        args.ffn, args.experts, args.topk, args.vocab, args.seq = 32, 8, 2, 128, 64
        args.steps, args.warmup, args.profile_steps = min(args.steps, 2), 1, 1
    return args


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    import transformers as T

    config = T.Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.ffn, num_experts=args.experts,
        num_experts_per_tok=args.topk, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=max(args.seq, 4096),
        attention_dropout=0.0, tie_word_embeddings=False, output_router_logits=False,
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kw: dict[str, Any] = {"attn_implementation": args.attn, "dtype": dtype}
    if args.experts_impl:
        kw["experts_implementation"] = args.experts_impl
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, **kw)
    model.to(device=device, dtype=dtype).train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_batch(args: argparse.Namespace, device: torch.device, rng: np.random.Generator):
    """Input tensors and each sample's token count, in the order ``prepare`` expects."""
    ids = torch.from_numpy(rng.integers(0, args.vocab, (args.batch, args.seq))).to(device)
    if args.packing == "padded":
        lengths = [args.seq] * args.batch
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        n = args.pack_seqs
        cuts = [args.seq * i // n for i in range(n + 1)]
        per_row = [cuts[i + 1] - cuts[i] for i in range(n)]
        pos = torch.cat([torch.arange(m) for m in per_row])[None].repeat(args.batch, 1)
        lengths = per_row * args.batch
        batch = {"input_ids": ids, "position_ids": pos.to(device)}
    batch["labels"] = ids
    return batch, lengths


def record_routing(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own top-k ids per router, ``[routers, batch * seq, k]``, replay off."""
    from trainer_hooks.hf import adapter_for

    sites = adapter_for(model.config).routers(model)
    got: dict[int, torch.Tensor] = {}
    hooks = [s.module.register_forward_hook(
        lambda m, i, o, layer=s.layer: got.__setitem__(layer, o[2].detach()))
        for s in sites]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    for h in hooks:
        h.remove()
    return torch.stack([got[s.layer] for s in sites])


def make_samples(args: argparse.Namespace, geometry: Any, own: np.ndarray,
                 tokens: np.ndarray, lengths: list[int], rng: np.random.Generator):
    """One ``RoutedSample`` per sequence from the recorded routing, perturbed (see the module
    docstring); also the fraction of (row, layer) routings changed."""
    from replay_bridge.sample import RoutedSample

    flat_tokens = tokens.reshape(-1)
    routed_all = own.transpose(1, 0, 2).copy()              # [rows, layers, k]
    rows, layers, k = routed_all.shape
    changed = np.zeros((rows, layers), bool)
    for layer in range(layers):
        pick = np.flatnonzero(rng.random(rows) < args.perturb)
        if args.perturb_mode == "random":
            for r in pick:
                row = routed_all[r, layer]
                free = np.setdiff1d(np.arange(geometry.num_experts), row)
                row[rng.integers(k)] = free[rng.integers(free.size)]
                changed[r, layer] = True
            continue
        rng.shuffle(pick)
        for a, b in zip(pick[0::2], pick[1::2]):
            ra, rb = routed_all[a, layer], routed_all[b, layer]
            xa = np.flatnonzero(~np.isin(ra, rb))
            xb = np.flatnonzero(~np.isin(rb, ra))
            if xa.size and xb.size:
                i, j = xa[rng.integers(xa.size)], xb[rng.integers(xb.size)]
                ra[i], rb[j] = rb[j], ra[i]
                changed[a, layer] = changed[b, layer] = True
    samples, start = [], 0
    for i, n in enumerate(lengths):
        samples.append(RoutedSample(
            sample_id=f"bench-{i}", tokens=flat_tokens[start:start + n].astype(np.int32),
            prompt_len=max(1, n // 4),
            routed=routed_all[start:start + n - 1].astype(geometry.id_dtype)))
        start += n
    return samples, float(changed.mean()), routed_all


def expert_load(ids: np.ndarray, experts: int) -> dict[str, Any]:
    """Per layer, the busiest expert's tokens over the mean, and the experts with no token."""
    counts = np.stack([np.bincount(ids[:, layer].ravel(), minlength=experts)
                       for layer in range(ids.shape[1])])
    return {"max_over_mean": [round(float(c.max() / c.mean()), 3) for c in counts],
            "idle_experts": [int((c == 0).sum()) for c in counts]}


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import transformers

    from trainer_hooks.hf import RoutingReplay, model_geometry

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.default_rng(args.seed)
    model = build_model(args, device)
    geometry = model_geometry(model)
    batch, lengths = make_batch(args, device, rng)
    fwd_kw = {k: v for k, v in batch.items()}
    prep_kw = ({"attention_mask": batch["attention_mask"]} if args.packing == "padded"
               else {"position_ids": batch["position_ids"]})

    own = record_routing(model, batch).cpu().numpy()
    samples, perturbed, replayed_ids = make_samples(
        args, geometry, own, batch["input_ids"].cpu().numpy(), lengths, rng)
    load = {name: expert_load(ids, geometry.num_experts)
            for name, ids in (("native", own.transpose(1, 0, 2)), ("replayed", replayed_ids))}
    opt = torch.optim.AdamW(model.parameters(), lr=0.0) if args.optimizer else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    state: dict[str, Any] = {"replay": None}

    def attach() -> RoutingReplay:
        if state["replay"] is None:
            state["replay"] = RoutingReplay(model, geometry, packing=args.packing)
        return state["replay"]

    def detach() -> None:
        if state["replay"] is not None:
            state["replay"].close()
            state["replay"] = None

    prelaid = attach().prepare(samples, **prep_kw)

    def body(arm: str, replay: RoutingReplay | None) -> None:
        model.zero_grad(set_to_none=True)
        if arm == "off":
            loss = model(**fwd_kw).loss
            loss.backward()
        else:
            mb = prelaid if arm == "on_prelaid" else replay.prepare(samples, **prep_kw)
            with replay.replaying(mb, measure=arm != "on_no_agreement"):
                loss = model(**fwd_kw).loss
                loss.backward()
        if opt is not None:
            opt.step()

    def step(arm: str) -> tuple[float, float]:
        """(device ms from CUDA events, or wall ms on CPU; wall ms)."""
        replay = None
        if arm == "off":
            detach()
        else:
            replay = attach()
        sync()
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            body(arm, replay)
            e1.record()
            sync()
            wall = (time.perf_counter() - t0) * 1e3
            return e0.elapsed_time(e1), wall
        t0 = time.perf_counter()
        body(arm, replay)
        wall = (time.perf_counter() - t0) * 1e3
        return wall, wall

    timed = interleaved_rounds(step, ARMS, args.steps, args.warmup)
    dev = {a: [d for d, _ in v] for a, v in timed.items()}
    wall = {a: [w for _, w in v] for a, v in timed.items()}

    # Agreement of one replayed step (own top-k against the ids routed).
    detach()
    replay = attach()
    replay.metrics()
    step("on")
    agreement = {k.removeprefix("routing_replay/"): v for k, v in replay.metrics().items()
                 if "/layer" not in k or k.endswith("/exact")}

    # Host layout + upload alone (prepare, then wait for the copy).
    t0 = time.perf_counter()
    n_prep = 10
    for _ in range(n_prep):
        replay.prepare(samples, **prep_kw)
    sync()
    prepare_ms = (time.perf_counter() - t0) / n_prep * 1e3

    syncs: dict[str, int] = {}
    kernel_ms: dict[str, float] = {}
    op_growth: list[dict[str, Any]] = []
    if cuda:
        syncs = host_syncs(step, ARMS)
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        per_op: dict[str, dict[str, tuple[int, float]]] = {}
        for a in ARMS:
            per, ops = [], {}
            for _ in range(args.profile_steps):
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    step(a)
                ka = prof.key_averages()
                # kernels and copies only (CPU ops' device time would count them twice)
                per.append(sum(e.self_device_time_total for e in ka
                               if e.device_type == DeviceType.CUDA) / 1e3)
                ops = {e.key: (e.count, e.self_device_time_total) for e in ka}
            kernel_ms[a] = statistics.median(per)
            per_op[a] = ops
        for name in set(per_op["on"]) | set(per_op["off"]):
            c_on, t_on = per_op["on"].get(name, (0, 0.0))
            c_off, t_off = per_op["off"].get(name, (0, 0.0))
            if t_on - t_off > 0 or c_on != c_off:
                op_growth.append({"op": name, "calls_off": c_off, "calls_on": c_on,
                                  "device_us_off": round(t_off, 1),
                                  "device_us_on": round(t_on, 1)})
        op_growth.sort(key=lambda x: x["device_us_on"] - x["device_us_off"], reverse=True)
        op_growth = op_growth[:20]
    detach()

    med = {a: statistics.median(v) for a, v in dev.items()}
    wmed = {a: statistics.median(v) for a, v in wall.items()}
    paired = {a: [x / y for x, y in zip(dev[a], dev["off"])] for a in ARMS[1:]}
    result: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        model=dict(family="qwen3_moe", init="random (Qwen3MoeConfig, no checkpoint)",
                   layers=args.layers, hidden=args.hidden, heads=args.heads,
                   kv_heads=args.kv_heads, head_dim=args.head_dim, experts=args.experts,
                   top_k=args.topk, expert_ffn=args.ffn, vocab=args.vocab,
                   dtype=args.dtype, attn_implementation=model.config._attn_implementation,
                   experts_implementation=model.config._experts_implementation),
        batch=dict(rows=args.batch, seq=args.seq, tokens=args.batch * args.seq,
                   packing=args.packing, sequences=len(lengths)),
        step=("forward + backward" + (" + AdamW step" if opt is not None else "")
              + (" with gradient checkpointing" if args.grad_ckpt else "")),
        grad_ckpt=args.grad_ckpt,
        optimizer=opt is not None,
        perturbed_row_fraction=perturbed,
        perturb_mode=args.perturb_mode,
        expert_load=load,
        steps=args.steps,
        warmup=args.warmup,
        arms=list(ARMS),
        timer="cuda events" if cuda else "wall clock (cpu)",
        median_ms=med,
        p10_ms={a: pct(v, 10) for a, v in dev.items()},
        p90_ms={a: pct(v, 90) for a, v in dev.items()},
        overhead_pct={a: 100.0 * (med[a] / med["off"] - 1.0) for a in ARMS[1:]},
        paired_overhead_pct={a: 100.0 * (statistics.median(v) - 1.0) for a, v in paired.items()},
        paired_overhead_p10_p90_pct={a: [100.0 * (pct(v, 10) - 1.0), 100.0 * (pct(v, 90) - 1.0)]
                                     for a, v in paired.items()},
        wall_median_ms=wmed,
        wall_overhead_pct={a: 100.0 * (wmed[a] / wmed["off"] - 1.0) for a in ARMS[1:]},
        kernel_ms_per_step=kernel_ms,
        kernel_overhead_pct={a: 100.0 * (kernel_ms[a] / kernel_ms["off"] - 1.0)
                             for a in ARMS[1:]} if kernel_ms else {},
        ops_grown_by_replay=op_growth,
        host_syncs_per_step=syncs,
        prepare_ms=prepare_ms,
        agreement=agreement,
        step_ms={a: [round(x, 3) for x in v] for a, v in dev.items()},
    )
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(text)
    return result


if __name__ == "__main__":
    main()
