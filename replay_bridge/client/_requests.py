"""Engine requests: token ids in, routed experts and log-probs asked for.

One plan per prompt: which HTTP requests to send and which sample ids each one returns.

- ``sglang`` (``/generate``): one request per sample, so that each goes through a PD router's
  merge (batched requests are not merged: their prompt rows would be garbage).
- ``sglang-openai`` (``/v1/completions``): one request per sample, ``n = 1``: with ``n > 1``
  SGLang returns only the first choice's routing in ``sglext``.
- ``vllm`` (``/v1/completions``): one request with ``n = G``; every choice carries its routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._prompts import PromptError

__all__ = ["ENGINE_PATHS", "EngineCall", "SamplingParams", "plan"]

ENGINE_PATHS = {
    "sglang": "/generate",
    "sglang-openai": "/v1/completions",
    "vllm": "/v1/completions",
}
CHAT_PATH = "/v1/chat/completions"
START_FIELD = {
    "sglang": "routed_experts_start_len",
    "sglang-openai": "routed_experts_start_len",
    "vllm": "routed_experts_prompt_start",
}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options every engine understands; ``extra`` is merged into the sampling part
    of the request as is (``sampling_params`` for ``/generate``, top level for OpenAI)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """When set, sample ``i`` of a prompt is drawn with seed ``seed + i`` (SGLang
    ``sampling_seed``, OpenAI ``seed``; vLLM's one request per group gets ``seed``)."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineCall:
    """One HTTP request and the sample ids its answer holds, in answer order."""

    path: str
    payload: dict[str, Any]
    sample_ids: tuple[str, ...]


def plan(
    engine: str,
    input_ids: Sequence[int],
    sample_ids: Sequence[str],
    params: SamplingParams,
    *,
    model: str | None = None,
    routed_start: int = 0,
    messages: Sequence[dict[str, Any]] | None = None,
) -> list[EngineCall]:
    """The requests that return one routed sample per id in ``sample_ids``; with ``messages``,
    chat completions (``sglang-openai`` and ``vllm`` only)."""
    if engine not in ENGINE_PATHS:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINE_PATHS)}")
    # Plain ints for JSON, from a list, a NumPy array or a CPU tensor alike.
    ids = list(input_ids) if isinstance(input_ids, (list, tuple)) \
        else np.asarray(input_ids).tolist()
    path = ENGINE_PATHS[engine]
    if messages is not None:
        if engine == "sglang":
            raise PromptError("chat prompts (messages) need --engine sglang-openai or vllm")
        if routed_start:
            raise PromptError("a chat prompt cannot skip routing rows; continue with token ids")
        path = CHAT_PATH
    if engine == "sglang":
        def generate(i: int) -> dict[str, Any]:
            sp = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                  "top_p": params.top_p, **params.extra}
            if params.seed is not None:
                sp["sampling_seed"] = params.seed + i
            return {
                "input_ids": ids,
                "sampling_params": sp,
                "return_routed_experts": True,
                "routed_experts_start_len": routed_start,
                "return_logprob": True,
            }

        return [EngineCall(path, generate(i), (sid,)) for i, sid in enumerate(sample_ids)]

    def openai(n: int, i: int = 0) -> dict[str, Any]:
        p: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
            "return_token_ids": True,
            **params.extra,
        }
        if messages is not None:
            p["messages"] = list(messages)
            p["logprobs"] = True
        else:
            p["prompt"] = ids
            p["logprobs"] = 0
        if model is not None:
            p["model"] = model
        if params.seed is not None:
            p["seed"] = params.seed + i
        if engine == "sglang-openai":
            p["return_routed_experts"] = True
        p[START_FIELD[engine]] = routed_start
        return p

    if engine == "sglang-openai":
        return [EngineCall(path, openai(1, i), (sid,)) for i, sid in enumerate(sample_ids)]
    return [EngineCall(path, openai(len(sample_ids)), tuple(sample_ids))]
