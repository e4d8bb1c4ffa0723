"""Host cost of the Hugging Face replay hook per router call, on the CPU.

A tiny random-init model of one family (hidden 32, 8 experts top-2 or 16 top-4), one of its
routers called directly on 16 tokens, forward + backward of a sum of its weights, so kernels
are tiny and what is timed is dispatch, autograd and Python: the host work the hook adds.
Arms, interleaved round by round: ``off`` (no pass active: the hook returns at once),
``on`` (a pass, ``measure=False``: ids, combine, weights), ``agree`` (the agreement counter's
``add_topk`` alone, as the hook calls it at a router's first call of a pass). Medians of
``--rounds`` rounds of ``--calls`` calls each, microseconds per call.

    python scripts/hf_hook_host_cost.py --family qwen3_moe --rounds 15 --calls 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def build(family: str):
    import transformers as T

    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                  max_position_embeddings=128, tie_word_embeddings=False)
    configs = {
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True),
        "mixtral": lambda: T.MixtralConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
            head_dim=8, num_local_experts=8, num_experts_per_tok=2),
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
            norm_topk_prob=True),
    }
    torch.manual_seed(0)
    config = configs[family]()
    config._attn_implementation = "eager"
    return T.AutoModelForCausalLM.from_config(config).float()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3_moe", choices=("qwen3_moe", "mixtral",
                                                               "deepseek_v3"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from replay_bridge.sample import RoutedSample
    from trainer_hooks.hf import RoutingReplay, model_geometry

    model = build(args.family)
    geometry = model_geometry(model)
    replay = RoutingReplay(model, geometry)
    router = replay._sites[0].module
    rng = np.random.default_rng(0)
    n = args.tokens
    keys = rng.random((n - 1, geometry.num_moe_layers, geometry.num_experts))
    routed = np.argsort(keys, -1)[..., :geometry.top_k].astype(geometry.id_dtype)
    sample = RoutedSample(sample_id="s0", tokens=rng.integers(0, 64, n).astype(np.int32),
                          prompt_len=n // 2, routed_start=0, routed=routed)
    mask = torch.ones(1, n, dtype=torch.int64)
    mb = replay.prepare([sample], attention_mask=mask)
    hidden = torch.randn(n, model.config.hidden_size)
    counter = replay._agreement
    own = router(hidden)[2]

    def fwd_bwd() -> None:
        _, w, _ = router(hidden)
        w.sum().backward()

    def off(calls: int) -> None:
        for _ in range(calls):
            fwd_bwd()

    def on(calls: int) -> None:
        with replay.replaying(mb, measure=False):
            for _ in range(calls):
                fwd_bwd()

    def agree(calls: int) -> None:
        ids = torch.where(mb.replayed, mb.targets[0], own)
        for _ in range(calls):
            counter.add_topk(0, own, ids, mb.region)

    arms = {"off": off, "on": on, "agree": agree}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for a in arms.values():
        a(20)
    for r in range(args.rounds):
        order = list(arms)[r % 3:] + list(arms)[:r % 3]
        for name in order:
            t0 = time.perf_counter()
            arms[name](args.calls)
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {a: statistics.median(v) for a, v in times.items()}
    out = {"family": args.family, "tokens": n, "torch": torch.__version__,
           "us_per_call": {"off": round(med["off"], 1), "on": round(med["on"], 1),
                           "hook_added": round(med["on"] - med["off"], 1),
                           "add_topk": round(med["agree"], 1)},
           "min_us": {a: round(min(v), 1) for a, v in times.items()}}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    replay.close()
    return out


if __name__ == "__main__":
    main()
