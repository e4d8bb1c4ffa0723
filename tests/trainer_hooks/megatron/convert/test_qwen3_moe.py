"""HF Qwen3-MoE -> megatron-core GPTModel: equal logits and routing on the same tokens (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_hooks.megatron.convert.conftest import TINY, make_hf_model, save_hf_model
from trainer_hooks.megatron.convert import (
    build_gpt_model,
    build_qwen3_moe_gpt,
    load_hf_qwen3_moe,
    megatron_config_from_hf,
    moe_layer_pattern,
)

BATCH, SEQ = 2, 24
LOGIT_ATOL = 2e-5  # measured 2e-6 .. 6e-6 with logits up to ~5

VARIANTS = {
    "all-moe": {},
    "tied-embeddings": {"tie_word_embeddings": True},
    "dense-first-layer": {"mlp_only_layers": [0]},
    "sparse-step-2": {"decoder_sparse_step": 2},
    "no-topk-renorm": {"norm_topk_prob": False},
}


def _tokens(seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=gen)


def _megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    # megatron masks where True; its default causal mask is allocated on "cuda", so pass one
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    return model(input_ids=ids, position_ids=position_ids, attention_mask=mask)


def _hf_forward(hf, ids: torch.Tensor):
    """Logits, and per MoE layer the router's (top-k ids, top-k weights) as [b, s, k]."""
    routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue

        def keep(module, args, out, i=i):
            _, weights, idx = out
            routing[i] = (idx.reshape(BATCH, SEQ, -1), weights.reshape(BATCH, SEQ, -1))

        hooks.append(gate.register_forward_hook(keep))
    try:
        logits = hf(input_ids=ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, routing


def _moe_layers(mg) -> list[tuple[int, torch.nn.Module]]:
    """(HF layer index, megatron router) for each MoE layer of a megatron model."""
    return [
        (layer.layer_number - 1, layer.mlp.router)
        for layer in mg.decoder.layers
        if hasattr(layer.mlp, "router")
    ]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, megatron_cpu, tmp_path_factory):
    """(variant, HF model, its checkpoint directory) for each variant."""
    hf = make_hf_model(seed=3, **VARIANTS[request.param])
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, path


def _check_against_transformers(hf, mg, ids: torch.Tensor) -> float:
    """Assert equal logits, top-k ids and routing weights; return the max |logit diff|."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = _moe_layers(mg)
    assert [i for i, _ in routers] == [
        i for i, moe in enumerate(moe_layer_pattern(hf.config)) if moe
    ]
    weights: dict[int, torch.Tensor] = {}
    hooks = [
        router.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[0]))
        for i, router in routers
    ]
    for _, router in routers:
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        mg_logits = _megatron_logits(mg, ids)
    finally:
        for hook in hooks:
            hook.remove()
    hf_logits, hf_routing = _hf_forward(hf, ids)

    diff = (mg_logits - hf_logits).abs().max().item()
    assert mg_logits.shape == hf_logits.shape == (BATCH, SEQ, hf.config.vocab_size)
    assert diff <= LOGIT_ATOL, f"max |logit diff| {diff}"

    assert sorted(hf_routing) == [i for i, _ in routers]
    for i, router in routers:
        hf_ids, hf_weights = hf_routing[i]
        # megatron's router sees tokens sequence-major: row = s * batch + b
        recorded = router.router_replay.get_recorded_indices()
        mg_ids = recorded.reshape(SEQ, BATCH, -1).transpose(0, 1)
        assert torch.equal(mg_ids, hf_ids), f"layer {i}: top-k ids differ"
        dense_hf = torch.zeros(BATCH, SEQ, hf.config.num_experts).scatter(-1, hf_ids, hf_weights)
        dense_mg = weights[i].reshape(SEQ, BATCH, -1).transpose(0, 1)
        assert torch.allclose(dense_mg, dense_hf, atol=1e-6), f"layer {i}: routing weights differ"
    return diff


@torch.no_grad()
def test_logits_and_routing_match_transformers(pair, router_replay_instances):
    variant, hf, path = pair
    mg = build_qwen3_moe_gpt(path).eval()
    diff = _check_against_transformers(hf, mg, _tokens())
    print(f"\n{variant}: max |logit diff| = {diff:.3g}")


@torch.no_grad()
def test_the_demo_checkpoint_converts(megatron_cpu, tmp_path, router_replay_instances):
    """`replay-bridge make-tiny-model` (bf16 on disk), loaded in fp32 by both sides."""
    from transformers import AutoModelForCausalLM

    from reference_engine import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mg = build_qwen3_moe_gpt(path, dtype=torch.float32).eval()
    assert mg.decoder.layers[0].mlp.router.weight.dtype == torch.float32
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ),
                        generator=torch.Generator().manual_seed(5))
    diff = _check_against_transformers(hf, mg, ids)
    print(f"\nmake-tiny-model checkpoint: max |logit diff| = {diff:.3g}")


@torch.no_grad()
def test_replaying_transformers_routing_keeps_its_weights(pair, router_replay_instances):
    """Under REPLAY_FORWARD of HF's own top-k ids, the router settings still give HF's logits."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    variant, hf, path = pair
    mg = build_qwen3_moe_gpt(path, routing_replay=True).eval()
    ids = _tokens(seed=11)
    hf_logits, hf_routing = _hf_forward(hf, ids)
    for i, router in _moe_layers(mg):
        target = hf_routing[i][0].transpose(0, 1).reshape(SEQ * BATCH, -1)
        router.router_replay.set_target_indices(target)
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    diff = (_megatron_logits(mg, ids) - hf_logits).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{variant}: replayed logits differ by {diff}"


@torch.no_grad()
def test_fused_state_dict_loads_like_the_checkpoint(
    megatron_cpu, tmp_path, router_replay_instances
):
    hf = make_hf_model(seed=5, mlp_only_layers=[1])
    path = save_hf_model(hf, tmp_path)
    state = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # fused in memory

    from_dir = build_qwen3_moe_gpt(path)
    from_state = build_gpt_model(hf.config, megatron_config_from_hf(hf.config))
    load_hf_qwen3_moe(from_state, state)
    a, b = dict(from_dir.named_parameters()), dict(from_state.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@torch.no_grad()
def test_qkv_layout_is_what_the_logits_check_sees(megatron_cpu, tmp_path, router_replay_instances):
    """The logit comparison catches a plain [q; k; v] concatenation (no per-group interleave)."""
    hf = make_hf_model(seed=9)
    mg = build_qwen3_moe_gpt(save_hf_model(hf, tmp_path)).eval()
    ids = _tokens()
    hf_logits, _ = _hf_forward(hf, ids)
    attn = hf.model.layers[0].self_attn
    plain = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    mg.decoder.layers[0].self_attention.linear_qkv.weight.copy_(plain)
    assert (_megatron_logits(mg, ids) - hf_logits).abs().max().item() > 1e-2


def test_missing_unused_and_misshapen_tensors_are_errors(
    megatron_cpu, tmp_path, router_replay_instances
):
    hf = make_hf_model(seed=1)
    state = dict(hf.state_dict())
    mg = build_gpt_model(hf.config, megatron_config_from_hf(hf.config))

    missing = {k: v for k, v in state.items() if k != "model.layers.2.self_attn.k_norm.weight"}
    with pytest.raises(KeyError, match="layers.2.self_attn.k_norm"):
        load_hf_qwen3_moe(mg, missing)

    extra = {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf_qwen3_moe(mg, extra)

    misshapen = {**state, "model.norm.weight": torch.ones(TINY["hidden_size"] + 1)}
    with pytest.raises(ValueError, match="final_layernorm"):
        load_hf_qwen3_moe(mg, misshapen)


def test_directory_without_safetensors_is_an_error(megatron_cpu, tmp_path, router_replay_instances):
    hf = make_hf_model(seed=1)
    mg = build_gpt_model(hf.config, megatron_config_from_hf(hf.config))
    with pytest.raises(FileNotFoundError):
        load_hf_qwen3_moe(mg, tmp_path)


def test_config_mapping():
    from transformers import Qwen3MoeConfig

    hf = Qwen3MoeConfig(**{**TINY, "mlp_only_layers": [0], "norm_topk_prob": False})
    cfg = megatron_config_from_hf(hf, routing_replay=False, moe_token_dispatcher_type="alltoall")
    assert cfg.moe_layer_freq == [0, 1, 1, 1]
    assert cfg.moe_router_pre_softmax is True
    assert cfg.moe_enable_routing_replay is False
    assert cfg.moe_token_dispatcher_type == "alltoall"
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.moe_ffn_hidden_size) == (2, 32, 32)
    assert cfg.moe_router_fusion is False and cfg.moe_router_load_balancing_type == "none"

    renorm = megatron_config_from_hf({**hf.to_dict(), "norm_topk_prob": True})
    assert renorm.moe_router_pre_softmax is False
    assert renorm.moe_layer_freq == [0, 1, 1, 1]
    assert renorm.moe_enable_routing_replay is True


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, [1, 1, 1, 1]),
        ({"mlp_only_layers": [0, 3]}, [0, 1, 1, 0]),
        ({"decoder_sparse_step": 2}, [0, 1, 0, 1]),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, [0, 0, 0, 1]),
    ],
)
def test_moe_layer_pattern(changes, expected):
    assert moe_layer_pattern({**TINY, **changes}) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"model_type": "qwen2_moe"},
        {"attention_bias": True},
        {"hidden_act": "gelu"},
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
    ],
)
def test_unsupported_configs_are_refused(changes):
    with pytest.raises(ValueError):
        megatron_config_from_hf({**TINY, "model_type": "qwen3_moe", **changes})


def test_rope_theta_from_old_and_new_config_layouts(megatron_cpu, router_replay_instances):
    for cfg in (
        {**TINY, "model_type": "qwen3_moe", "rope_theta": 5e5},
        {**TINY, "model_type": "qwen3_moe", "rope_parameters": {"rope_type": "default",
                                                                 "rope_theta": 5e5}},
    ):
        mg = build_gpt_model(cfg, megatron_config_from_hf(cfg))
        assert mg.rotary_pos_emb.inv_freq[1].item() == pytest.approx(5e5 ** (-2 / 32))


def test_converted_model_trains_under_replay(megatron_cpu, tmp_path, router_replay_instances):
    """Backward through a converted model with replayed routes: only replayed experts learn."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    mg = build_qwen3_moe_gpt(save_hf_model(make_hf_model(seed=2), tmp_path), routing_replay=True)
    gen = torch.Generator().manual_seed(3)
    rows = SEQ * BATCH
    targets = []
    for _, router in _moe_layers(mg):
        # distinct ids per row drawn from experts 0..6: expert 7 receives no token
        ids = torch.stack([torch.randperm(7, generator=gen)[:2] for _ in range(rows)])
        router.router_replay.set_target_indices(ids)
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        targets.append(ids)
    tokens = _tokens()
    logits = _megatron_logits(mg, tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    RouterReplay.clear_global_indices()

    for (_, router), layer in zip(_moe_layers(mg), [l for l in mg.decoder.layers
                                                     if hasattr(l.mlp, "router")]):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        experts = layer.mlp.experts.local_experts
        used = experts[0].linear_fc1.weight.grad
        assert used is not None and used.abs().sum() > 0
        idle = experts[7].linear_fc1.weight.grad
        assert idle is None or idle.abs().sum() == 0
    assert torch.isfinite(loss)
