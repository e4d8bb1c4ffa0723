"""vLLM's OpenAI endpoints: ``choices[i].routed_experts`` as base64 of a ``.npy`` image.

Every choice carries its own routing ``[rows, num_layers, top_k]`` (rows from the request's
``routed_experts_prompt_start``), so a group of ``G`` samples is one request with ``n = G``.
Older servers sent JSON lists instead: prompt rows at response level, generated rows per choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pybase64

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample
from . import _assemble as A
from . import _openai as O
from ._base import Completion, EngineCall, SamplingParams, token_list
from ._npy import parse_npy, to_npy
from ._payload import Payloads

__all__ = ["START_FIELD", "VLLM"]

START_FIELD = "routed_experts_prompt_start"
"""vLLM's request field: the first token position to return routing for."""

_MISSING = ("choice carries no routed_experts (server started without "
            "--enable-return-routed-experts?)")


def _routing(choice: dict[str, Any], response: dict[str, Any], payloads: Payloads,
             ) -> np.ndarray | DecodeFault:
    value = choice.get("routed_experts")
    if value is None:
        return DecodeFault("missing_routing", _MISSING)
    if isinstance(value, list):
        # Older JSON-list form: prompt rows at response level, generated rows per choice.
        try:
            gen = A.int_array(value, "routed_experts")
            prompt_part = response.get("prompt_routed_experts")
            if prompt_part is None:
                return gen
            rows = A.int_array(prompt_part, "prompt_routed_experts")
        except A.BadField as e:
            return DecodeFault("malformed", str(e))
        if not gen.size:
            return rows
        if not rows.size:
            return gen
        if rows.ndim != gen.ndim or rows.shape[1:] != gen.shape[1:] or not rows.ndim:
            return DecodeFault("malformed", f"prompt_routed_experts {rows.shape} and "
                               f"routed_experts {gen.shape} do not stack")
        return np.concatenate([rows, gen])
    try:
        return parse_npy(payloads.decode(value))
    except ValueError as e:
        return DecodeFault("malformed", f"routed_experts: {e}")


class VLLM(O.OpenAIProtocol):
    """vLLM ``POST /v1/completions`` (chat: ``/v1/chat/completions``): one request per
    prompt, ``n = G``."""

    name = "vllm"
    start_field = START_FIELD

    def plan(
        self, input_ids: Sequence[int], sample_ids: Sequence[str], params: SamplingParams, *,
        model: str | None = None, routed_start: int = 0,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[EngineCall]:
        path = O.check_chat(messages, routed_start)
        body = O.request(token_list(input_ids), params, len(sample_ids), 0, model=model,
                         messages=messages, routing_fields={START_FIELD: routed_start})
        return [EngineCall(path, body, tuple(sample_ids))]

    def calls_per_prompt(self, samples: int) -> int:
        return 1

    def decode(
        self, request: dict[str, Any], response: Any, payloads: Payloads,
        geometry: RoutingGeometry, sample_id: str, group_id: str | None = None,
        policy_version: int | None = None,
    ) -> list[WireSample]:
        """One sample per choice, ``<sample_id>/<index>`` when there are several."""
        ctx = A.Context(self.name, group_id, policy_version)
        out = []
        for _, index, sid, choice in O.choices(ctx, request, response, sample_id):
            if isinstance(choice, WireSample):
                out.append(choice)
                continue
            try:
                prompt_ids = A.first_present(A.request_prompt(request),
                                             choice.get("prompt_token_ids"),
                                             response.get("prompt_token_ids"))
                prompt, output, start = A.align(request, prompt_ids, choice.get("token_ids"),
                                                START_FIELD)
                logprobs = O.choice_logprobs(choice, int(output.size))
                finish = A.finish_reason(choice.get("finish_reason"))
            except A.BadField as e:
                out.append(ctx.failed(sid, "malformed", str(e), index=index))
                continue
            out.append(A.build(
                sample_id=sid, index=index, prompt=prompt, output=output, start=start,
                routing=_routing(choice, response, payloads), engine=ctx.engine,
                group_id=group_id, policy_version=policy_version, logprobs=logprobs,
                finish=finish,
            ))
        return out

    def encode_routing(self, rows: np.ndarray, dtype: str | None = None) -> str:
        """Base64 of the ``.npy`` image of ``rows`` (as ``dtype`` when given)."""
        arr = np.asarray(rows) if dtype is None else np.asarray(rows).astype(dtype)
        return pybase64.b64encode(to_npy(arr)).decode("ascii")

    def decode_routing(self, value: Any, geometry: RoutingGeometry,
                       dtype: str | None = None) -> np.ndarray:
        """The array in one ``routed_experts`` value (``ValueError`` when not readable)."""
        return parse_npy(Payloads().decode(value))

    def encode_response(
        self, request: dict[str, Any], completions: Sequence[Completion], *,
        dtype: str | None = None,
    ) -> Any:
        """Choices, each with its own ``routed_experts``."""
        prompt = A.request_prompt(request)
        choice_list = []
        for i, c in enumerate(completions):
            choice = O.encode_choice(i, prompt, c)
            if c.routing is not None:
                choice["routed_experts"] = self.encode_routing(c.routing, dtype)
            choice_list.append(choice)
        return O.response(request, choice_list)
