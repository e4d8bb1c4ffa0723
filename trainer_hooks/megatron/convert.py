"""Hugging Face Qwen3-MoE checkpoints as megatron-core ``GPTModel`` s.

Builds a megatron-core ``TransformerConfig`` and a local-spec ``GPTModel`` (no Transformer
Engine, SequentialMLP experts) from a Qwen3-MoE ``config.json``, and copies the checkpoint's
weights into it. Weights are read with ``safetensors``; both the per-expert layout that
``save_pretrained`` writes (``mlp.experts.{e}.gate_proj.weight`` ...) and the fused in-memory
layout of transformers 5 (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj``
``[E, H, I]``) are accepted.

Megatron's parallel state must be initialised before a model is built
(``parallel_state.initialize_model_parallel``). Tensor parallelism (and expert tensor
parallelism) must be 1; pipeline stages and expert-parallel ranks load only the layers and
experts they hold.

The router is configured to reproduce transformers' routing weights: Qwen3-MoE takes a softmax
over all experts, then the top-k; with ``norm_topk_prob`` the k weights are renormalised, which
equals megatron-core's default (top-k on the logits, then a softmax over those k); without it,
``moe_router_pre_softmax=True`` (softmax over all experts, then top-k). Both settings keep their
meaning under ``RouterReplay``. Load balancing is off, nothing is dropped, and the fused router
(which skips replay) is disabled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from replay_bridge.geometry import hf_moe_layers

__all__ = [
    "build_gpt_model",
    "build_qwen3_moe_gpt",
    "load_hf_qwen3_moe",
    "megatron_config_from_hf",
    "moe_layer_pattern",
    "read_hf_config",
]

_SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory, as a dict."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def _as_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    raise TypeError(f"expected a config mapping or a transformers config, got {type(hf_config)}")


def _num_experts(cfg: Mapping[str, Any]) -> int:
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key):
            return int(cfg[key])
    raise ValueError("config has no num_experts / num_local_experts")


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def _check_supported(cfg: Mapping[str, Any]) -> None:
    model_type = cfg.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of "
                         f"{_SUPPORTED_MODEL_TYPES}")
    if cfg.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (megatron-core's local spec "
                         "has no output-projection bias without add_bias_linear)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU only)")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    _rope_theta(cfg)


def moe_layer_pattern(hf_config: Mapping[str, Any] | Any) -> list[int]:
    """Per layer, 1 for a MoE layer and 0 for a dense one (megatron's ``moe_layer_freq`` list),
    by :func:`replay_bridge.geometry.hf_moe_layers` (Qwen3-MoE: layer ``i`` is MoE when it is
    not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``)."""
    cfg = _as_dict(hf_config)
    moe = set(hf_moe_layers(cfg))
    return [int(i in moe) for i in range(int(cfg["num_hidden_layers"]))]


def megatron_config_from_hf(
    hf_config: Mapping[str, Any] | Any,
    *,
    dtype: torch.dtype = torch.float32,
    routing_replay: bool = True,
    **overrides: Any,
):
    """A megatron-core ``TransformerConfig`` equivalent to a Qwen3-MoE HF config.

    ``overrides`` are ``TransformerConfig`` fields applied last (for example
    ``moe_token_dispatcher_type="alltoall"`` or parallel sizes).
    """
    from megatron.core.transformer import TransformerConfig

    cfg = _as_dict(hf_config)
    _check_supported(cfg)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    pattern = moe_layer_pattern(cfg)
    kwargs: dict[str, Any] = dict(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        # MoE
        num_moe_experts=_num_experts(cfg),
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        moe_router_topk=int(cfg["num_experts_per_tok"]),
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_fusion=False,
        moe_grouped_gemm=False,
        moe_enable_routing_replay=routing_replay,
        # precision and placement
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    hf_config: Mapping[str, Any] | Any,
    config=None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
):
    """An (unloaded) local-spec ``GPTModel`` shaped like a Qwen3-MoE HF config.

    ``config`` defaults to :func:`megatron_config_from_hf`. ``pre_process`` / ``post_process``
    default to whether this rank holds the first / last pipeline stage. The vocabulary is not
    padded, so logits have the checkpoint's ``vocab_size`` columns.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    cfg = _as_dict(hf_config)
    if config is None:
        config = megatron_config_from_hf(cfg)
    stage = dict(ignore_virtual=False, vp_stage=vp_stage)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(**stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(**stage)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=int(cfg["vocab_size"]),
        max_sequence_length=int(cfg.get("max_position_embeddings") or 4096),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        vp_stage=vp_stage,
    )


class _SafetensorsDir(Mapping[str, torch.Tensor]):
    """Every ``*.safetensors`` file of a directory as one lazy name -> tensor mapping."""

    def __init__(self, path: str | Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where: dict[str, int] = {}
        for i, handle in enumerate(self._handles):
            for key in handle.keys():
                self._where[key] = i

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _Source:
    """HF tensors by name, recording which were read."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.weights = weights
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.weights

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weights:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        self.used.add(key)
        return self.weights[key]


def _qkv(src: _Source, prefix: str, config) -> torch.Tensor:
    """HF q/k/v projections as megatron's ``linear_qkv``: per query group, [q heads, k, v]."""
    groups = config.num_query_groups
    per_group = config.num_attention_heads // groups
    d = config.kv_channels
    q = src.get(f"{prefix}.q_proj.weight")
    k = src.get(f"{prefix}.k_proj.weight")
    v = src.get(f"{prefix}.v_proj.weight")
    h = q.shape[-1]
    q = q.reshape(groups, per_group * d, h)
    k = k.reshape(groups, d, h)
    v = v.reshape(groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def _expert(src: _Source, prefix: str, expert: int, which: str) -> torch.Tensor:
    """One expert's ``linear_fc1`` (concat(gate, up)) or ``linear_fc2`` (down) weight."""
    if f"{prefix}.experts.gate_up_proj" in src:  # fused transformers-5 layout
        name = "gate_up_proj" if which == "fc1" else "down_proj"
        return src.get(f"{prefix}.experts.{name}")[expert]
    base = f"{prefix}.experts.{expert}"
    if which == "fc1":
        return torch.cat(
            [src.get(f"{base}.gate_proj.weight"), src.get(f"{base}.up_proj.weight")], dim=0
        )
    return src.get(f"{base}.down_proj.weight")


_LAYER_PARAM = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT_PARAM = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_(fc1|fc2)\.weight")
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "decoder"):
        raise TypeError(f"expected a megatron GPTModel (or a wrapper of one), got {type(model)}")
    return model


def _hf_tensor(name: str, model: torch.nn.Module, src: _Source) -> torch.Tensor:
    config = model.config
    if name == "embedding.word_embeddings.weight":
        return src.get("model.embed_tokens.weight")
    if name == "decoder.final_layernorm.weight":
        return src.get("model.norm.weight")
    if name == "output_layer.weight":  # a tied model's last pipeline stage holds a copy
        tied = model.share_embeddings_and_output_weights
        return src.get("model.embed_tokens.weight" if tied else "lm_head.weight")
    match = _LAYER_PARAM.fullmatch(name)
    if match is None:
        raise KeyError(f"no Qwen3-MoE source for megatron parameter {name!r}")
    layer = model.decoder.layers[int(match.group(1))]
    prefix = f"model.layers.{layer.layer_number - 1}"
    rest = match.group(2)
    if rest in _LAYER_DIRECT:
        return src.get(f"{prefix}.{_LAYER_DIRECT[rest]}")
    if rest == "self_attention.linear_qkv.weight":
        return _qkv(src, f"{prefix}.self_attn", config)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat(
            [src.get(f"{prefix}.mlp.gate_proj.weight"), src.get(f"{prefix}.mlp.up_proj.weight")]
        )
    expert = _EXPERT_PARAM.fullmatch(rest)
    if expert is not None:
        local = int(expert.group(1))
        global_id = layer.mlp.local_expert_indices[local]
        return _expert(src, f"{prefix}.mlp", global_id, expert.group(2))
    raise KeyError(f"no Qwen3-MoE source for megatron parameter {name!r}")


@torch.no_grad()
def load_hf_qwen3_moe(
    model: torch.nn.Module,
    source: Mapping[str, torch.Tensor] | str | Path,
) -> None:
    """Copy a Qwen3-MoE HF checkpoint into a local-spec megatron ``GPTModel``, in place.

    ``source`` is a model directory (``*.safetensors``) or a state dict of
    ``Qwen3MoeForCausalLM`` (per-expert or fused expert tensors). Every parameter of the model
    is written; a missing HF tensor raises ``KeyError``, a shape mismatch ``ValueError``. When
    the model holds every layer and expert, HF tensors left unused also raise ``ValueError``.
    """
    model = _unwrap(model)
    config = model.config
    if config.tensor_model_parallel_size != 1 or (config.expert_tensor_parallel_size or 1) != 1:
        raise ValueError("tensor parallelism is not supported (tp and etp must be 1)")
    weights = source if isinstance(source, Mapping) else _SafetensorsDir(source)
    src = _Source(weights)
    for name, param in model.named_parameters():
        tensor = _hf_tensor(name, model, src)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint gives shape {tuple(tensor.shape)}, model has "
                f"{tuple(param.shape)}"
            )
        param.copy_(tensor.to(dtype=param.dtype, device=param.device))
    whole = (
        config.pipeline_model_parallel_size == 1
        and config.expert_model_parallel_size == 1
        and (config.virtual_pipeline_model_parallel_size or 1) == 1
    )
    if whole:
        ignorable = {"lm_head.weight"} if model.share_embeddings_and_output_weights else set()
        unused = sorted(set(weights) - src.used - ignorable)
        if unused:
            shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
            raise ValueError(
                f"{len(unused)} checkpoint tensors have no place in the model: {shown}"
            )


def build_qwen3_moe_gpt(
    model_dir: str | Path,
    *,
    routing_replay: bool = True,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """A megatron ``GPTModel`` holding the weights of a Qwen3-MoE HF model directory.

    ``routing_replay`` sets ``moe_enable_routing_replay`` (one ``RouterReplay`` per MoE layer,
    appended to megatron-core's process-wide instance list). ``overrides`` go to
    :func:`megatron_config_from_hf`. Parameters are created on the CPU in ``dtype``; move the
    model to a device afterwards.
    """
    hf_config = read_hf_config(model_dir)
    config = megatron_config_from_hf(
        hf_config, dtype=dtype, routing_replay=routing_replay, **overrides
    )
    model = build_gpt_model(hf_config, config)
    load_hf_qwen3_moe(model, model_dir)
    return model
