"""``replay-bridge demo``: the whole trip on one machine, and the mismatch that replay removes.

A tiny Qwen3-MoE checkpoint is served by the reference engine in prefill/decode mode (bf16) or by
vLLM; N prompts x G samples come back with routing and log-probs, are checked and stored as
shards, and validated; the same weights are loaded into a megatron-core ``GPTModel`` (fp32) and
trained for a few GRPO-style steps twice from identical weights, rollout routing replay off and
on. Measured: routing agreement with the rollout per MoE layer, and the rollout-vs-trainer
log-prob mismatch (k3 KL, mean and max absolute difference).

Each step is its own module (``engines``, ``rollouts``, ``batches``, ``trainer``, ``mismatch``,
``weights``, ``plot``), driven by ``recipe.run_demo`` from a YAML config (``default.yaml``); the
GRPO objective is the recipes' shared ``replay_recipes.grpo``.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigError, DemoConfig, load_config
    from .recipe import DemoResult, run_demo

# Imported on first use: the CLI loads this package's ``cli`` module at every start, and the
# recipe pulls in torch, megatron-core and the client.
_HOMES = {"ConfigError": "config", "DemoConfig": "config", "load_config": "config",
          "DemoResult": "recipe", "run_demo": "recipe"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{home}", __name__), name)


__all__ = ["ConfigError", "DemoConfig", "DemoResult", "load_config", "run_demo"]
