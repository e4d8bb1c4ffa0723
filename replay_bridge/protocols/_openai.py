"""The OpenAI completions shape that ``sglang-openai`` and ``vllm`` share: the request body,
the ``choices`` list of the answer, and a choice on the engine side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..sample import WireSample, short_repr, type_name
from . import _assemble as A
from ._base import Completion, Protocol, SamplingParams, token_list

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class OpenAIProtocol(Protocol):
    """What the OpenAI-shaped protocols share: the endpoints, and ``n`` samples a request."""

    path = COMPLETIONS_PATH
    chat_path = CHAT_PATH

    def samples_asked(self, request: dict[str, Any]) -> int:
        n = asked(request)
        return n if isinstance(n, int) else 1


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


def asked(request: dict[str, Any]) -> int | str:
    """The request's ``n`` (``1`` when absent), or what is wrong with it."""
    n = request.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= A.MAX_SAMPLES:
        return f"request n={short_repr(n)} is not an integer in [1, {A.MAX_SAMPLES}]"
    return n


def choices(
    ctx: A.Context, request: dict[str, Any], response: Any, sample_id: str
) -> list[tuple[int, int, str, dict[str, Any] | WireSample]]:
    """``(position, index, sample_id, choice)`` for each choice of the answer.

    ``index`` is the choice's own ``index`` (its position when absent); ids get ``/<index>``
    when the request asks for several (``n`` > 1). A ``malformed`` sample stands in for a
    choice that is not an object (taking its position as index), and for one whose index is
    not an integer in ``[0, n)`` or repeats an earlier one (index ``-1``, id
    ``<sample_id>/choice-<position>``: it answers no asked-for sample). An answer without a
    choices list, or a request with a bad ``n``, is ``malformed`` for every asked-for sample.
    """
    n = asked(request)
    if isinstance(n, str):
        return [(0, 0, sample_id, ctx.failed(sample_id, "malformed", n))]
    if not isinstance(response, dict):
        return [(i, i, w.sample_id, w) for i, w in enumerate(ctx.all_failed(
            sample_id, n, f"the answer is {type_name(response)}, expected an object with a "
                          "choices list"))]
    items = response.get("choices")
    if not isinstance(items, list):
        what = "has no choices list" if items is None else \
            f"has choices {type_name(items)}, expected a list"
        return [(i, i, w.sample_id, w) for i, w in enumerate(ctx.all_failed(
            sample_id, n, f"the answer {what}"))]
    out: list[tuple[int, int, str, dict[str, Any] | WireSample]] = []
    seen: set[int] = set()
    for pos, choice in enumerate(items):
        idx = choice.get("index", pos) if isinstance(choice, dict) else pos
        usable = isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < n
        if not usable or idx in seen:
            why = f"repeats index {idx}" if usable else \
                f"has index {short_repr(idx)}, expected an integer in [0, {n})"
            if not isinstance(choice, dict):
                why += f" and is {type_name(choice)}, not an object"
            junk = f"{sample_id}/choice-{pos}"
            out.append((pos, -1, junk, ctx.failed(junk, "malformed", f"choice {pos} {why}",
                                                  index=-1)))
            continue
        seen.add(idx)
        sid = A.answer_id(sample_id, idx, n)
        if isinstance(choice, dict):
            out.append((pos, idx, sid, choice))
        else:
            out.append((pos, idx, sid, ctx.failed(
                sid, "malformed", f"choice {pos} is {type_name(choice)}, not an object",
                index=idx)))
    return out


def choice_logprobs(choice: dict[str, Any], completion_len: int) -> np.ndarray | None:
    """OpenAI ``logprobs``: completions (``token_logprobs``) or chat (``content``);
    :class:`~._assemble.BadField` when unreadable."""
    lp = choice.get("logprobs")
    if lp is None:
        return None
    if not isinstance(lp, dict):
        raise A.BadField(f"logprobs is {type_name(lp)}, expected an object")
    tokens = lp.get("token_logprobs")
    if tokens is None or tokens == []:
        return A.logprob_array(lp.get("content"), "logprobs.content", completion_len,
                               "objects")
    return A.logprob_array(tokens, "logprobs.token_logprobs", completion_len, "numbers")


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
