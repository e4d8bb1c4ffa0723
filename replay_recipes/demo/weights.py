"""Evidence that the trainer holds the engine's weights: the megatron-core model built from the
checkpoint and the transformers model give the same fp32 logits on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer_hooks.megatron.cpu_world import fresh_router_replay_list

__all__ = ["max_logit_difference"]


@torch.no_grad()
def max_logit_difference(model_dir: Path, tokens: np.ndarray) -> float:
    """``max |logits_megatron - logits_transformers|`` over ``tokens`` (one sequence), both in
    fp32 with native routing. Needs a megatron world."""
    from transformers import AutoModelForCausalLM

    from trainer_hooks.megatron.convert import build_qwen3_moe_gpt

    ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
    n = ids.shape[1]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                              local_files_only=True).eval()
    hf_logits = hf(input_ids=ids).logits.float()
    del hf
    fresh_router_replay_list()
    mg = build_qwen3_moe_gpt(model_dir, routing_replay=False, dtype=torch.float32).eval()
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
    mg_logits = mg(input_ids=ids, position_ids=torch.arange(n)[None], attention_mask=mask)
    del mg
    fresh_router_replay_list()
    return float((mg_logits.float() - hf_logits).abs().max())
