"""Overhead of the router replay hook on a training step, replay on vs off in the same run.

A megatron-core MoE GPTModel that fills a GPU (default: 8 layers, hidden 2048, 64 experts
top-8, expert FFN 768, sequence 4096, bf16 through ``Float16Module``, all-to-all dispatcher).
The rollout routing replayed is the model's own native routing (recorded first with replay
off), so every arm sends the same tokens to the same experts and the timing difference is the
hook's alone. Arms are interleaved (off, on, on-without-agreement, rotated every round) and
the figures are medians. A step is: lay out and upload the micro-batch's routing (replay arms),
forward and backward through Megatron's schedule. Host syncs are counted per arm with
``torch.cuda.set_sync_debug_mode("warn")``.

Prints one JSON object (and writes it to ``--out``)::

    python scripts/gpu/replay_overhead.py --out overhead.json
    python scripts/gpu/replay_overhead.py --cpu --tiny        # logic check on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from arm_timing import host_syncs, interleaved_rounds
from replay_bridge.sample import RoutedSample
from trainer_hooks.megatron import Packing, RoutingReplay, model_geometry, moe_routers
from trainer_hooks.megatron.steps import make_forward_step


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = not args.cpu
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_token_dispatcher_type="alltoall",
        moe_enable_routing_replay=True, moe_aux_loss_coeff=0.0, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=args.cpu, moe_router_dtype="fp32",
        **(dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=1) if args.recompute else {}),
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope").to(device)
    if bf16:
        model = Float16Module(config, model)
    return model, config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small model (logic check)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--recompute", action="store_true", help="full activation recompute")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.heads, args.ffn = 2, 64, 4, 64
        args.experts, args.topk, args.seq, args.vocab, args.rounds = 8, 2, 64, 128, 3

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from trainer_hooks.megatron import cpu_compat

    if args.cpu:
        cpu_compat.apply()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        device = torch.device("cpu")
    else:
        cpu_compat.apply_te_gemm_fix()  # megatron-core 0.16.x without Transformer Engine
        torch.cuda.set_device(0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29731")
        dist.init_process_group("nccl", rank=0, world_size=1)
        device = torch.device("cuda", 0)
    ps.initialize_model_parallel()
    if not args.cpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    model, config = build(args, device)
    geo = model_geometry(config)
    sync = (lambda: torch.cuda.synchronize()) if not args.cpu else (lambda: None)

    rng = np.random.default_rng(0)
    s = args.seq
    tokens = torch.from_numpy(rng.integers(0, args.vocab, (1, s))).to(device)
    pos = torch.arange(s, device=device)[None]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), 1)[None, None]
    batch = {"tokens": tokens, "position_ids": pos, "attention_mask": mask}
    forward_step = make_forward_step()  # mean(output ** 2) as the loss

    # Record the model's own routing (replay off) and store it as the rollout's.
    native: dict[int, torch.Tensor] = {}
    hooks = [r.module.register_forward_hook(
        lambda mod, i, o, l=r.layer: native.__setitem__(l, o[1].detach()))
        for r in moe_routers(model, mtp=True)]
    fb = get_forward_backward_func()
    with torch.no_grad():
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
           num_microbatches=1, seq_length=s, micro_batch_size=1, forward_only=True)
    for h in hooks:
        h.remove()
    routed = np.stack([
        np.sort(native[l].float().topk(geo.top_k, dim=-1).indices.cpu().numpy(), -1)
        for l in geo.moe_layers], axis=1)[:-1].astype(geo.id_dtype)
    sample = RoutedSample(sample_id="bench-0", tokens=tokens[0].cpu().numpy().astype(np.int32),
                          prompt_len=s // 4, routed=routed)

    replay_a = RoutingReplay(model, geo, packing=Packing.bshd(s))
    fwd = replay_a.wrap_forward_step(forward_step)

    def step(arm: str) -> float:
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        if arm == "off":
            fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
               num_microbatches=1, seq_length=s, micro_batch_size=1, forward_only=False)
        else:
            mb = replay_a.prepare([sample])
            with replay_a.replaying([mb], measure=arm == "on"):
                fb(forward_step_func=fwd, data_iterator=iter([batch]), model=[model],
                   num_microbatches=1, seq_length=s, micro_batch_size=1, forward_only=False)
        sync()
        return time.perf_counter() - t0

    arms = ["off", "on", "on_no_agreement"]
    # replay_a.metrics() after warm-up drops the warm-up counts
    times = interleaved_rounds(step, arms, args.rounds, args.warmup, replay_a.metrics)
    metrics = replay_a.metrics()
    ratios = {a: statistics.median(x / y for x, y in zip(times[a], times["off"]))
              for a in arms[1:]}

    # Host syncs per step, by arm (megatron's all-to-all dispatcher syncs on its own).
    syncs = host_syncs(step, arms) if not args.cpu else {}

    # Device (kernel + copy) time per step, by arm, from the profiler: noise-free figure of
    # the GPU work the hook adds.
    device_ms: dict[str, float] = {}
    if not args.cpu:
        from torch.profiler import ProfilerActivity, profile

        for a in arms:
            per = []
            for _ in range(3):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step(a)
                per.append(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3)
            device_ms[a] = statistics.median(per)

    # Host-side layout and upload alone.
    t0 = time.perf_counter()
    for _ in range(20):
        replay_a.layout([sample])
    layout_ms = (time.perf_counter() - t0) / 20 * 1e3

    med = {a: statistics.median(v) * 1e3 for a, v in times.items()}
    result = dict(
        device=torch.cuda.get_device_name(0) if not args.cpu else "cpu",
        torch=torch.__version__,
        model=dict(layers=args.layers, hidden=args.hidden, experts=args.experts,
                   top_k=args.topk, ffn=args.ffn, seq=args.seq,
                   dtype="bf16" if not args.cpu else "fp32", dispatcher="alltoall"),
        rounds=args.rounds,
        median_ms=med,
        min_ms={a: min(v) * 1e3 for a, v in times.items()},
        recompute=args.recompute,
        overhead_pct=100.0 * (med["on"] / med["off"] - 1.0),
        overhead_no_agreement_pct=100.0 * (med["on_no_agreement"] / med["off"] - 1.0),
        paired_overhead_pct={a: 100.0 * (r - 1.0) for a, r in ratios.items()},
        host_layout_ms=layout_ms,
        device_ms_per_step=device_ms,
        device_overhead_pct={a: 100.0 * (device_ms[a] / device_ms["off"] - 1.0)
                             for a in arms[1:]} if device_ms else {},
        host_syncs_per_step=syncs,
        agreement={k.removeprefix("routing_replay/"): v for k, v in metrics.items()},
        step_ms={a: [round(x * 1e3, 2) for x in v] for a, v in times.items()},
    )
    replay_a.close()
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
