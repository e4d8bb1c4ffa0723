"""The OpenAI completions shape that ``sglang-openai`` and ``vllm`` share: the request body,
the ``choices`` list of the answer, and a choice on the engine side."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..sample import WireSample
from . import _assemble as A
from ._base import Completion, SamplingParams, token_list

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def request(
    ids: list[int], params: SamplingParams, n: int, i: int, *, model: str | None,
    messages: Sequence[dict[str, Any]] | None, routing_fields: dict[str, Any],
) -> dict[str, Any]:
    """The body of one completions (or, with ``messages``, chat) request for ``n`` choices;
    ``i`` offsets the seed; ``routing_fields`` (the protocol's) come last."""
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
    p.update(routing_fields)
    return p


def check_chat(messages: Sequence[dict[str, Any]] | None, routed_start: int) -> str:
    """The path to post to (``ValueError`` for a chat prompt that skips routing rows)."""
    if messages is None:
        return COMPLETIONS_PATH
    if routed_start:
        raise ValueError("a chat prompt cannot skip routing rows; continue with token ids")
    return CHAT_PATH


def choices(
    ctx: A.Context, request: dict[str, Any], response: Any, sample_id: str
) -> Iterator[tuple[int, int, str, dict[str, Any] | WireSample]]:
    """``(position, index, sample_id, choice)`` for each choice; a ``malformed`` sample in
    place of a choice that is not an object. ``index`` is the choice's own ``index`` (its
    position when absent, ``-1`` when not an integer); ids get ``/<index>`` when there are
    several choices."""
    if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
        yield 0, 0, sample_id, ctx.failed(sample_id, "malformed", "response has no choices list")
        return
    items = response["choices"]
    many = len(items) > 1 or int(request.get("n", 1) or 1) > 1
    for pos, choice in enumerate(items):
        idx = choice.get("index", pos) if isinstance(choice, dict) else pos
        index = idx if isinstance(idx, int) and not isinstance(idx, bool) else -1
        sid = f"{sample_id}/{idx}" if many else sample_id
        if isinstance(choice, dict):
            yield pos, index, sid, choice
        else:
            yield pos, index, sid, ctx.failed(sid, "malformed", "choice is not an object",
                                              index=index)


def choice_logprobs(choice: dict[str, Any]) -> np.ndarray | None:
    """OpenAI ``logprobs``: completions (``token_logprobs``) or chat (``content``)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    return A.logprob_array(lp.get("token_logprobs") or lp.get("content"))


def encode_choice(index: int, prompt: Any, c: Completion) -> dict[str, Any]:
    """One choice as an engine sends it (routing left to the protocol)."""
    out = token_list(c.output_ids)
    choice: dict[str, Any] = {"index": index, "text": "", "finish_reason": c.finish_reason,
                              "token_ids": out}
    if isinstance(prompt, list):
        choice["prompt_token_ids"] = prompt
    if c.logprobs is not None:
        choice["logprobs"] = {"token_logprobs": np.asarray(c.logprobs, np.float64).tolist()}
    choice.update(c.meta)
    return choice


def response(request: dict[str, Any], choice_list: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer object around ``choice_list``."""
    chat = "messages" in request
    return {"id": "cmpl-0", "object": "chat.completion" if chat else "text_completion",
            "choices": choice_list}
