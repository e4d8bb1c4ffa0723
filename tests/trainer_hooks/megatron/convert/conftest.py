"""Megatron on a CPU in this process: gloo world of one, CPU shims, tiny Qwen3-MoE checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="package")
def megatron_cpu() -> Iterator[None]:
    """Megatron parallel state (tp = pp = ep = 1) and the CPU shims, shared with other tests.

    Initialises only what is not initialised yet and tears down only what it created.
    """
    from trainer_hooks.megatron.cpu_world import megatron_cpu_world

    with megatron_cpu_world(torch.get_num_threads()):
        yield


@pytest.fixture
def router_replay_instances() -> Iterator[list[Any]]:
    """megatron-core's process-wide RouterReplay list; instances a test appends are removed."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    instances = RouterReplay.global_router_replay_instances
    before = len(instances)
    try:
        yield instances
    finally:
        for instance in instances[before:]:
            instance.clear_indices()
            instance.clear_router_replay_action()
        del instances[before:]


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def make_hf_model(seed: int = 0, **changes: Any):
    """A random tiny ``Qwen3MoeForCausalLM`` whose weights are large enough to matter.

    transformers' init (std 0.02, unit norms) makes every logit tiny; here every matrix is
    N(0, 0.15^2) and every norm weight 1 + N(0, 0.1^2), so a mis-mapped tensor shows in the logits
    and router choices are far from ties.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**{**TINY, **changes})
    model = Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.15 * noise)
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
