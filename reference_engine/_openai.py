"""OpenAI-style ``/v1/completions`` and ``/v1/chat/completions`` on top of a worker.

Each prompt and choice becomes one ``/generate`` sequence; the response carries the first
choice's routing at ``sglext.routed_experts`` (as SGLang does) and, with ``return_meta_info``,
each choice's full ``meta_info``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._model import ModelRunner
from ._worker import SGLANG, RequestError, Worker

__all__ = ["chat_completion", "completion"]


async def completion(w: Worker, body: Any) -> dict[str, Any]:
    """The response to a ``/v1/completions`` request (raises :class:`RequestError`)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return await _openai(w, body, chat=False)


async def chat_completion(w: Worker, body: Any) -> dict[str, Any]:
    """The response to a ``/v1/chat/completions`` request (raises :class:`RequestError`)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise RequestError("a chat request needs a list of messages")
    prompt = w.runner.chat_prompt(body["messages"])
    body = {**body, "prompt": prompt}
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]
    if body.get("logprobs") is False:
        body["logprobs"] = None
    return await _openai(w, body, chat=True)


async def _openai(w: Worker, body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """An OpenAI-style (chat) completion: one ``/generate`` item per prompt and choice."""
    if body.get("stream"):
        raise RequestError("streaming OpenAI-style requests are not supported by this engine")
    gen_body, n, n_prompts = _completion_to_generate(body)
    items, _ = w.items(gen_body)
    gens = await asyncio.gather(*(w.run(it) for it in items))
    rets = [w.body(it, g) for it, g in zip(items, gens)]
    want_logprobs = body.get("logprobs") is not None
    choices = []
    for idx, ret in enumerate(rets):
        meta = ret["meta_info"]
        finish = meta["finish_reason"] or {}
        choice: dict[str, Any] = {"index": idx}
        if chat:
            choice["message"] = {"role": "assistant", "content": ret.get("text", "")}
            choice["logprobs"] = _chat_logprobs(w.runner, ret) if want_logprobs else None
        else:
            choice["text"] = ret.get("text", "")
            choice["logprobs"] = _openai_logprobs(w.runner, ret) if want_logprobs else None
        choice["finish_reason"] = finish.get("type")
        choice["matched_stop"] = finish.get("matched")
        if body.get("return_token_ids"):
            choice["token_ids"] = ret["output_ids"]
        if body.get("return_meta_info"):
            choice["meta_info"] = meta
        choices.append(choice)
    prompt_tokens = sum(len(items[i * n].prompt) for i in range(n_prompts))
    completion_tokens = sum(r["meta_info"]["completion_tokens"] for r in rets)
    out: dict[str, Any] = {
        "id": rets[0]["meta_info"]["id"],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or w.config.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "metadata": {"weight_version": w.config.weight_version},
    }
    if body.get("return_token_ids"):
        out["prompt_token_ids"] = items[0].prompt if n_prompts == 1 else [
            items[i * n].prompt for i in range(n_prompts)]
    first = rets[0]["meta_info"].get("routed_experts")
    if first is not None:  # response level: the first choice's routing only (as SGLang)
        out["sglext"] = {"routed_experts": first}
    return out


def _completion_to_generate(body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    """Translate an OpenAI completion request into a batched ``/generate`` body."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    n = int(body.get("n", 1) or 1)
    if n < 1:
        raise RequestError("n must be >= 1")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and isinstance(prompt[0], int)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a list of those")
    expanded = [p for p in prompts for _ in range(n)]
    if any(isinstance(p, str) for p in expanded):
        if not all(isinstance(p, str) for p in expanded):
            raise RequestError("mixing text and token-id prompts is not supported")
        key, value = "text", expanded
    else:
        key, value = "input_ids", expanded
    seed = body.get("seed")
    room = body.get("bootstrap_room")
    if isinstance(room, list):
        room = room[0] if room else None
    sps = []
    for i in range(len(expanded)):
        sp = {
            "max_new_tokens": _get(body, "max_tokens", 16),
            "temperature": _get(body, "temperature", 1.0),
            "top_p": _get(body, "top_p", 1.0),
            "top_k": _get(body, "top_k", -1),
            "stop_token_ids": body.get("stop_token_ids") or [],
            "stop": body.get("stop"),
            "ignore_eos": bool(body.get("ignore_eos", False)),
        }
        # Distinct seeds per choice that both PD workers agree on.
        if seed is not None:
            sp["sampling_seed"] = int(seed) + i
        elif room is not None:
            sp["sampling_seed"] = int(room) + i
        sps.append(sp)
    gen: dict[str, Any] = {
        key: value,
        "sampling_params": sps,
        "return_logprob": body.get("logprobs") is not None,
        "return_routed_experts": bool(body.get("return_routed_experts", False)),
        SGLANG.start_field: SGLANG.requested_start(body),
    }
    if body.get("rid") is not None:
        gen["rid"] = body["rid"]
    return gen, n, len(prompts)


def _get(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _chat_logprobs(runner: ModelRunner, ret: dict[str, Any]) -> dict[str, Any]:
    pairs = ret["meta_info"].get("output_token_logprobs") or []
    return {"content": [{"token": runner.token_text(tok) or str(tok), "logprob": lp,
                         "bytes": None, "top_logprobs": []} for lp, tok, _ in pairs]}


def _openai_logprobs(runner: ModelRunner, ret: dict[str, Any]) -> dict[str, Any]:
    pairs = ret["meta_info"].get("output_token_logprobs") or []
    tokens = [runner.token_text(tok) or str(tok) for _, tok, _ in pairs]
    offsets, acc = [], 0
    for t in tokens:
        offsets.append(acc)
        acc += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in pairs],
            "top_logprobs": [None] * len(tokens), "text_offset": offsets}
