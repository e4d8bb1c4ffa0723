"""Multi-rank check of the Qwen3-MoE loader (run with torchrun on 2 GPUs, NCCL).

    torchrun --standalone --nproc-per-node 2 -m tests.trainer_hooks.megatron.convert.multirank {ep2,pp2} DIR [--cpu]

Rank 0 writes the checkpoint into DIR. With ``--cpu``: gloo and the CPU shims instead of NCCL
and CUDA.

``ep2``: expert parallel 2 (each rank holds 4 of 8 experts; alltoall dispatcher, allgather on the
CPU, where gloo rejects the split sizes alltoall passes); every rank
forwards the same tokens and compares logits and per-layer top-k ids with transformers.
``pp2``: pipeline parallel 2 (two layers a stage, the first dense); a forward-only pipeline
schedule; the last stage compares logits with transformers. ``pp2-tied``: the same with tied
embeddings (the last stage's output layer holds a copy of the embedding; GPUs only). Prints one
JSON line per rank and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

BATCH, SEQ = 2, 24
ATOL = 1e-4


def main(layout: str, ckpt: Path, cpu: bool) -> int:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.router_replay import RouterReplayAction
    from transformers import AutoModelForCausalLM

    from tests.trainer_hooks.megatron.convert.conftest import TINY, make_hf_model
    from trainer_hooks.megatron import cpu_compat
    from trainer_hooks.megatron.convert import (
        build_gpt_model,
        load_hf_qwen3_moe,
        megatron_config_from_hf,
        read_hf_config,
    )

    if cpu:
        cpu_compat.apply()
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        cpu_compat.apply_te_gemm_fix()  # megatron-core 0.16.x without Transformer Engine
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        device = torch.device("cuda", torch.cuda.current_device())
    rank = dist.get_rank()
    sizes = {"ep2": dict(expert_model_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2),
             "pp2-tied": dict(pipeline_model_parallel_size=2)}
    parallel_state.initialize_model_parallel(**sizes[layout])
    if not cpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # attention forks this RNG

    if rank == 0:
        tied = layout.endswith("-tied")
        make_hf_model(seed=3, mlp_only_layers=[0], tie_word_embeddings=tied).save_pretrained(ckpt)
    dist.barrier()

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    hf_cfg = read_hf_config(ckpt)
    dispatcher = "allgather" if cpu else "alltoall"  # gloo rejects tensor split sizes
    config = megatron_config_from_hf(hf_cfg, moe_token_dispatcher_type=dispatcher, **sizes[layout])
    model = build_gpt_model(hf_cfg, config)
    load_hf_qwen3_moe(model, ckpt)
    model = model.to(device).eval()

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen).to(device)
    pos = torch.arange(SEQ, device=device).unsqueeze(0).expand(BATCH, -1)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool, device=device), 1)[None, None]

    hf_ids = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda m, a, out, i=i: hf_ids.__setitem__(i, out[2].reshape(BATCH, SEQ, -1))
        )
        for i, layer in enumerate(hf.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
    for h in hooks:
        h.remove()

    routers = [(l.layer_number - 1, l.mlp.router) for l in model.decoder.layers
               if hasattr(l.mlp, "router")]
    for _, router in routers:
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    result = {"rank": rank, "layout": layout,
              "layers": [l.layer_number for l in model.decoder.layers]}
    if hasattr(model.decoder.layers[-1].mlp, "local_expert_indices"):
        result["local_experts"] = list(model.decoder.layers[-1].mlp.local_expert_indices)
    with torch.no_grad():
        if layout.startswith("pp2"):
            def step(data_iterator, m):
                out = m(input_ids=ids, position_ids=pos, attention_mask=mask)
                return out, lambda o: (o.sum() * 0.0, {"logits": o.detach().clone()})

            store = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([None]), model=[model],
                num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
            )
            logits = store[0]["logits"] if parallel_state.is_pipeline_last_stage() else None
        else:
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask)

    ok = True
    if logits is not None:
        diff = (logits - hf_logits).abs().max().item()
        result["max_abs_logit_diff"] = diff
        ok &= diff <= ATOL
    same = {
        i: bool(torch.equal(
            r.router_replay.get_recorded_indices().reshape(SEQ, BATCH, -1).transpose(0, 1),
            hf_ids[i]))
        for i, r in routers
    }
    result["topk_ids_equal"] = same
    ok &= all(same.values())
    result["ok"] = ok
    # One write per line: ranks share stdout, and print() writes the text and the newline
    # separately when unbuffered (PYTHONUNBUFFERED), so two ranks' lines could interleave.
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("layout", choices=["ep2", "pp2", "pp2-tied"])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    sys.exit(main(args.layout, args.ckpt, args.cpu))
