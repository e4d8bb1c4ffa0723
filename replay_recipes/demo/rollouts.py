"""Collect N prompts x G samples with routing and log-probs into shards."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from replay_bridge.client import CollectSummary, Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardWriter, is_dataset
from .config import CollectConfig
from .engines import EngineHandle

__all__ = ["PROMPT_TEXTS", "collect_rollouts", "demo_prompts", "fresh_shard_dir"]

PROMPT_TEXTS = (
    "What is 12 plus 30? Please think step by step.",
    "The router of a mixture of experts layer sends every token to",
    "Solve the equation, check the result, and write it down:",
    "User: hello! Assistant:",
    "A prefill worker runs the prompt, a decode worker",
    "Tokens, layers, experts, weights and gradients are",
    "Numbers such as 0 1 2 3 4 5 6 7 8 9 appear in questions:",
    "During reinforcement learning the inference engine samples rollouts and",
)


def demo_prompts(model_dir: Path, n: int) -> list[Prompt]:
    """``n`` prompts (GRPO groups ``p0`` ... ``p{n-1}``) tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    out = []
    for i in range(n):
        text = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
        if i >= len(PROMPT_TEXTS):
            text = f"({i // len(PROMPT_TEXTS)}) {text}"
        out.append(Prompt(f"p{i}", list(tok(text, add_special_tokens=True)["input_ids"])))
    return out


def fresh_shard_dir(path: Path) -> Path:
    """An empty shard directory at ``path``: a previous demo's dataset there is removed; any
    other non-empty directory is refused (nothing that is not ours is deleted)."""
    if path.exists():
        if path.is_dir() and is_dataset(path):
            shutil.rmtree(path)
        elif not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not a shard directory of an earlier "
                                  "demo; choose another --out")
    return path


def collect_rollouts(
    engine: EngineHandle,
    geometry: RoutingGeometry,
    prompts: list[Prompt],
    config: CollectConfig,
    shard_dir: Path,
) -> CollectSummary:
    """Ask the engine for ``samples_per_prompt`` samples of every prompt; store the good ones,
    quarantine the rest (the writer is closed on return, also on error)."""
    params = SamplingParams(max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, top_p=1.0)
    # SGLang's wire (the reference engine) takes a start offset; vLLM is asked for every row.
    routed_start = config.routed_start if engine.wire == "sglang" else 0

    async def run(writer: ShardWriter) -> CollectSummary:
        async with RolloutClient(engine.endpoint, engine.wire, geometry,
                                 model=engine.served_model, params=params,
                                 concurrency=config.concurrency,
                                 timeout=config.request_timeout_s) as client:
            return await collect(client, prompts, writer,
                                 samples_per_prompt=config.samples_per_prompt,
                                 routed_start=routed_start)

    with ShardWriter(fresh_shard_dir(shard_dir), geometry) as writer:
        return asyncio.run(run(writer))
