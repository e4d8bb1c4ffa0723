"""Test support: tiny megatron-core MoE GPT models on a CPU (with the CPU shims), synthetic
rollout samples, and a capture of what every router actually routed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from trainer_hooks.megatron import Packing, moe_routers
from trainer_hooks.megatron.steps import make_forward_step

VOCAB = 64


def model_config(**overrides: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32,
        num_moe_experts=8, moe_router_topk=2, use_cpu_initialization=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        moe_enable_routing_replay=True, moe_token_dispatcher_type="alltoall",
        params_dtype=torch.float32, moe_aux_loss_coeff=0.0,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_model(seed: int = 0, mtp: bool = False, **overrides: Any) -> Any:
    """A GPTModel whose layers follow ``moe_layer_freq``; earlier RouterReplay instances are
    cleared first (tests build many models in one process)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(seed)
    config = model_config(**overrides)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    kw: dict[str, Any] = {}
    if mtp:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        kw["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, spec.layer_specs[-1], use_transformer_engine=False
        )
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
        max_sequence_length=256, position_embedding_type="rope", **kw,
    )


def random_routing(rng: np.random.Generator, rows: int, layers: int, k: int, e: int) -> np.ndarray:
    """``[rows, layers, k]`` uint8 ids, distinct within each block (vectorised)."""
    keys = rng.random((rows, layers, e))
    return np.argsort(keys, axis=-1)[..., :k].astype(np.uint8)


def make_samples(
    geometry: RoutingGeometry, lengths: Sequence[int], prompt_lens: Sequence[int] | None = None,
    seed: int = 0, prefix: str = "s",
) -> list[RoutedSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        pl = prompt_lens[i] if prompt_lens else max(1, n // 2)
        out.append(RoutedSample(
            sample_id=f"{prefix}{i}",
            tokens=rng.integers(0, VOCAB, n).astype(np.int32),
            prompt_len=pl,
            routed=random_routing(rng, n - 1, geometry.num_moe_layers, geometry.top_k,
                                  geometry.num_experts),
        ))
    return out


def batch_inputs(samples: Sequence[RoutedSample], packing: Packing) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch as the trainer would build them. THD packing is run as
    one row with a block-diagonal causal mask (megatron-core's local attention has no THD
    kernel); the routers see the same token order as with ``cu_seqlens``."""
    n = np.array([s.num_tokens for s in samples])
    if packing.format == "bshd":
        s_len = packing.seq_length
        tok = np.zeros((len(samples), s_len), np.int64)
        for i, s in enumerate(samples):
            tok[i, : s.num_tokens] = s.tokens
        mask = torch.triu(torch.ones(s_len, s_len, dtype=torch.bool), 1)[None, None]
        pos = torch.arange(s_len).expand(len(samples), s_len)
        return {"tokens": torch.from_numpy(tok), "position_ids": pos, "attention_mask": mask}
    padded = packing.padded_lengths(n)
    total = int(padded.sum())
    tok = np.zeros(total, np.int64)
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    for i, s in enumerate(samples):
        tok[starts[i] : starts[i] + s.num_tokens] = s.tokens
    seq = np.repeat(np.arange(len(samples)), padded)
    pos = np.arange(total) - starts[seq]
    same = seq[:, None] == seq[None, :]
    causal = np.arange(total)[:, None] >= np.arange(total)[None, :]
    mask = torch.from_numpy(~(same & causal))[None, None]
    return {"tokens": torch.from_numpy(tok)[None], "position_ids": torch.from_numpy(pos)[None],
            "attention_mask": mask}


class RoutingCapture:
    """Records every router call's routing map (``bool [tokens, experts]``) by wire layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {}
        self._handles = [r.module.register_forward_hook(self._hook(r.layer))
                         for r in moe_routers(model)]

    def _hook(self, layer: int):
        def hook(mod: Any, inp: Any, out: Any) -> None:
            self.calls.setdefault(layer, []).append(out[1].detach().clone())
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def routing_map_ids(routing_map: torch.Tensor, k: int) -> np.ndarray:
    """Sorted expert ids ``[tokens, k]`` of a routing map (asserts k per token)."""
    m = routing_map.cpu().numpy()
    assert (m.sum(-1) == k).all(), "a token routed to other than k experts"
    return np.sort(np.argsort(~m, axis=-1, kind="stable")[:, :k], axis=-1)


def run_pass(
    model: Any, replay: Any, batches: Iterable[dict[str, torch.Tensor]], num_microbatches: int,
    seq_length: int, micro_batch_size: int, forward_only: bool = False,
) -> list[Any]:
    """One pass through megatron's schedule with the replay-wrapped forward step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_step = make_forward_step()
    fwd = replay.wrap_forward_step(forward_step) if replay is not None else forward_step
    return get_forward_backward_func()(
        forward_step_func=fwd, data_iterator=iter(list(batches)), model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
