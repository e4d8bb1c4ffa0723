"""Test support: tiny random-init ``transformers`` MoE models of each covered family (float32,
eager attention), synthetic rollout samples, batches laid out padded (either side) or packed,
and an independent record of what every experts module was really called with."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
              max_position_embeddings=128, tie_word_embeddings=False)


def _configs() -> dict[str, Any]:
    import transformers as T

    return {
        # 4 layers, layer 1 dense (mlp_only_layers), top-2 of 8, norm_topk_prob
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
            num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            mlp_only_layers=[1], norm_topk_prob=True),
        # 3 layers, top-2 of 8 (always normalised)
        "mixtral": lambda: T.MixtralConfig(
            **COMMON, intermediate_size=16, num_hidden_layers=3, num_key_value_heads=2,
            head_dim=8, num_local_experts=8, num_experts_per_tok=2),
        # 3 layers, shared expert, top-4 of 16, no norm_topk_prob (its default)
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2,
            num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1),
        # 3 layers, dense prefix of 1, 16 experts in 4 groups (2 kept), top-4, scaled 2.5
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5),
        "glm4_moe": lambda: T.Glm4MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_key_value_heads=2, head_dim=8, n_routed_experts=16, num_experts_per_tok=4,
            n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5),
    }


FAMILY_NAMES = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny ``...ForCausalLM`` of ``family``, float32, eager attention, router weights (and
    the DeepSeek/GLM correction bias) drawn at random so that routing is far from ties."""
    import transformers as T

    torch.manual_seed(seed)
    config = _configs()[family]()
    config._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate"):
                mod.weight.normal_(0.0, 0.5)
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def random_routing(rng: np.random.Generator, rows: int, layers: int, k: int, e: int) -> np.ndarray:
    keys = rng.random((rows, layers, e))
    return np.argsort(keys, axis=-1)[..., :k].astype(np.uint8)


def make_samples(
    geometry: RoutingGeometry, lengths: Sequence[int], seed: int = 0, prefix: str = "s",
    routed_start: Sequence[int] = (), native: dict[int, Sequence[int]] | None = None,
) -> list[RoutedSample]:
    """Samples with random distinct ids; ``routed_start[i]`` drops sample ``i``'s first rows;
    ``native[i]``: routing rows of sample ``i`` marked native (their ids zeroed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        r = routed_start[i] if i < len(routed_start) else 0
        routed = random_routing(rng, n - 1, geometry.num_moe_layers, geometry.top_k,
                                geometry.num_experts)[r:].copy()
        marks = None
        if native and i in native:
            marks = np.zeros(routed.shape[0], bool)
            marks[list(native[i])] = True
            routed[marks] = 0
        out.append(RoutedSample(
            sample_id=f"{prefix}{i}", tokens=rng.integers(0, VOCAB, n).astype(np.int32),
            prompt_len=max(1, n // 2), routed_start=r, routed=routed, native=marks))
    return out


def padded_batch(samples: Sequence[RoutedSample], seq: int, side: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, seq]``, padded on ``side``."""
    ids = np.zeros((len(samples), seq), np.int64)
    mask = np.zeros((len(samples), seq), np.int64)
    for i, s in enumerate(samples):
        n = s.num_tokens
        sl = slice(0, n) if side == "right" else slice(seq - n, seq)
        ids[i, sl] = s.tokens
        mask[i, sl] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def packed_batch(samples: Sequence[RoutedSample], pad: int = 0) -> dict[str, torch.Tensor]:
    """One row: the samples concatenated, ``position_ids`` restarting at 0 per sequence (as
    flash-attention varlen training packs them); ``pad`` > 0 adds that many masked-out tokens
    at the end (then an ``attention_mask`` is given)."""
    tok = np.concatenate([s.tokens for s in samples] + [np.zeros(pad, np.int32)]).astype(np.int64)
    pos = np.concatenate([np.arange(s.num_tokens) for s in samples] + [np.arange(pad)])
    out = {"input_ids": torch.from_numpy(tok)[None], "position_ids": torch.from_numpy(pos)[None]}
    if pad:
        mask = np.ones(tok.size, np.int64)
        mask[tok.size - pad:] = 0
        out["attention_mask"] = torch.from_numpy(mask)[None]
    return out


def expected_rows(samples: Sequence[RoutedSample], spans: Sequence[tuple[int, int]], total: int,
                  moe_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference, one sample at a time (not the hook's layout code): for each flat grid row,
    the stored ids at ``moe_index`` (``-1`` where none) and whether the row has rollout
    routing. ``spans``: (first flat row, length) per sample."""
    k = samples[0].routed.shape[-1]
    ids = np.full((total, k), -1, np.int64)
    for s, (start, n) in zip(samples, spans):
        full = s.full_routing()[:, moe_index]          # -1 at rows without routing
        ids[start:start + n] = full
    return ids, (ids >= 0).all(-1)


_LAYER = re.compile(r"layers\.(\d+)\.mlp\.experts$")


class ExpertsCapture:
    """Forward pre-hooks on every ``layers.N.mlp.experts`` module (what the sparse block
    really hands its experts): per wire layer, every call's ``(hidden, top_k_index,
    top_k_weights)`` and the family's own routing of that hidden input, from the router's
    own ``forward`` (bypassing every hook) with the experts' input."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.gates: dict[int, torch.nn.Module] = {}
        self._handles = []
        for name, mod in model.named_modules():
            m = _LAYER.search(name)
            if m:
                layer = int(m.group(1))
                block = model.get_submodule(name.rsplit(".", 1)[0])
                self.gates[layer] = block.gate
                self._handles.append(mod.register_forward_pre_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(mod: Any, args: Any) -> None:
            hidden, idx, w = args[0], args[1], args[2]
            with torch.no_grad():
                _, own_w, own_idx = type(self.gates[layer]).forward(self.gates[layer], hidden)
            self.calls.setdefault(layer, []).append(
                {"hidden": hidden, "ids": idx.detach().clone(), "weights": w,
                 "own_ids": own_idx, "own_weights": own_w})
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def family_weights(family: str, gate: torch.nn.Module, hidden: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """The combine weights the family's paper/model card defines, written independently of the
    hook's adapters: Qwen: softmax over all experts at the ids (renormalised if
    ``norm_topk_prob``); Mixtral: softmax over the k chosen logits; DeepSeek-V3 / GLM: sigmoid
    at the ids (renormalised if ``norm_topk_prob``) times the routed scaling factor."""
    cfg = gate
    if family in ("deepseek_v3", "glm4_moe"):
        logits = F.linear(hidden.float(), gate.weight.float())
        s = torch.sigmoid(logits).gather(1, ids)
        if cfg.norm_topk_prob:
            s = s / (s.sum(-1, keepdim=True) + 1e-20)
        return s * cfg.routed_scaling_factor
    logits = F.linear(hidden, gate.weight)
    if family == "mixtral":
        return torch.softmax(logits.gather(1, ids).float(), dim=-1)
    p = torch.exp(logits.float() - logits.float().logsumexp(-1, keepdim=True)).gather(1, ids)
    if cfg.norm_topk_prob:
        p = p / p.sum(-1, keepdim=True)
    return p.to(logits.dtype)
