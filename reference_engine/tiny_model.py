"""A deterministic tiny Qwen3-MoE checkpoint (4 layers, top-2 of 8 experts) for tests and demos.

The weights come from a NumPy generator seeded with a fixed seed and filled parameter by
parameter in name order, so the same seed gives byte-identical files whatever torch's own
initialisers do. The tokenizer is a byte-level BPE trained with ``tokenizers`` on a fixed
built-in text, so any string encodes. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["TINY_CONFIG", "make_tiny_model"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512

# head_dim 32: vLLM's CPU attention backend only serves head sizes it has kernels for.
TINY_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "output_router_logits": False,
}

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The router of a mixture of experts layer sends every token to a few experts. During
reinforcement learning the inference engine samples rollouts and the trainer updates the
policy; when both route the same token differently, the update is computed for a model that
never produced the sample. Rollout routing replay records the experts chosen at inference
time and makes the trainer use them again. A prefill worker runs the prompt, a decode worker
generates the completion, and a router joins their answers. Numbers such as 0 1 2 3 4 5 6 7 8 9
and 10 100 1000 appear in questions: what is 12 plus 30? The answer is 42. Please think step
by step, then give the final answer. User: hello! Assistant: hi, how can I help you today?
Solve the equation, check the result, and write it down. Tokens, layers, experts, weights,
gradients, samples, batches, shards and manifests are words of this small world.
"""


def _tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _fill_weights(model, seed: int) -> None:  # noqa: ANN001 - a transformers model
    """Fill every parameter from one seeded NumPy generator, in parameter-name order."""
    import torch

    rng = np.random.default_rng(seed)
    hidden = TINY_CONFIG["hidden_size"]
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            values = np.ones(p.shape, dtype=np.float32)
        elif name.endswith("mlp.gate.weight"):
            # A sharp router: top-k well separated, so routing is decisive and tie-free.
            values = rng.standard_normal(p.shape, dtype=np.float32) * (4.0 / np.sqrt(hidden))
        elif name.endswith("embed_tokens.weight"):
            values = rng.standard_normal(p.shape, dtype=np.float32)
        else:
            fan_in = p.shape[-1]
            values = rng.standard_normal(p.shape, dtype=np.float32) / np.sqrt(fan_in)
        with torch.no_grad():
            p.copy_(torch.from_numpy(values))


def _add_legacy_config_keys(path: Path) -> None:
    """Also write the key names older transformers releases (as pinned by vLLM) read."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("num_experts", TINY_CONFIG["num_experts"])
    cfg.setdefault("rope_theta", TINY_CONFIG["rope_theta"])
    cfg.setdefault("torch_dtype", cfg.get("dtype", "bfloat16"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny Qwen3-MoE checkpoint and its tokenizer to ``out_dir``; return the path.

    Weights are stored in bfloat16, as real checkpoints are.
    """
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _tokenizer(out)
    config = Qwen3MoeConfig(
        **TINY_CONFIG,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config)
    _fill_weights(model, seed)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
        pad_token_id=special["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    _add_legacy_config_keys(out / "config.json")
    (out / "replay_bridge.json").write_text(
        json.dumps({"kind": "tiny-qwen3-moe", "seed": seed, "preset": "tiny-qwen3-moe"}, indent=2)
        + "\n"
    )
    return out
