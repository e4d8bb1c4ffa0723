"""SGLang's OpenAI endpoints (``/v1/completions``, ``/v1/chat/completions``) with ``sglext``.

Routing is encoded as for ``/generate`` (:mod:`._sglang_generate`). It comes back at the
response-level ``sglext.routed_experts``, which SGLang fills for the first choice only, or per
choice in ``choices[i].meta_info`` when the request sets ``return_meta_info``. So the plan is
one request per sample, ``n = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample
from . import _assemble as A
from . import _openai as O
from ._base import Completion, EngineCall, Protocol, SamplingParams, token_list
from ._payload import Payloads
from ._sglang_generate import (START_FIELD, decode_routing, encode_routing, routing_from_value,
                               routing_meta)

__all__ = ["SGLangOpenAI"]


class SGLangOpenAI(Protocol):
    """SGLang ``POST /v1/completions`` (chat: ``/v1/chat/completions``): one request per
    sample, ``n = 1``."""

    name = "sglang-openai"
    path = O.COMPLETIONS_PATH
    chat_path = O.CHAT_PATH
    start_field = START_FIELD

    def plan(
        self, input_ids: Sequence[int], sample_ids: Sequence[str], params: SamplingParams, *,
        model: str | None = None, routed_start: int = 0,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[EngineCall]:
        path = O.check_chat(messages, routed_start)
        ids = token_list(input_ids)
        fields = {"return_routed_experts": True, START_FIELD: routed_start}
        return [EngineCall(path, O.request(ids, params, 1, i, model=model, messages=messages,
                                           routing_fields=fields), (sid,))
                for i, sid in enumerate(sample_ids)]

    def decode(
        self, request: dict[str, Any], response: Any, payloads: Payloads,
        geometry: RoutingGeometry, sample_id: str, group_id: str | None = None,
        policy_version: int | None = None,
    ) -> list[WireSample]:
        """Routing from ``choices[i].meta_info.routed_experts`` when the request set
        ``return_meta_info``, else from the response-level ``sglext.routed_experts``, which
        SGLang fills for the first choice only: later choices without ``meta_info`` get
        ``missing_routing``."""
        ctx = A.Context(self.name, group_id, policy_version)
        sglext = (response.get("sglext") if isinstance(response, dict) else None) or {}
        out = []
        for pos, index, sid, choice in O.choices(ctx, request, response, sample_id):
            if isinstance(choice, WireSample):
                out.append(choice)
                continue
            meta = choice.get("meta_info") or {}
            prompt_ids = A.request_prompt(request) or (
                choice.get("prompt_token_ids") or response.get("prompt_token_ids")
                or meta.get("prompt_token_ids") or sglext.get("prompt_token_ids"))
            output_ids = next((v for v in (choice.get("token_ids"), choice.get("output_ids"),
                                           meta.get("output_ids")) if v is not None), None)
            aligned = A.align(ctx, sid, request, prompt_ids, output_ids, START_FIELD, index)
            if isinstance(aligned, WireSample):
                out.append(aligned)
                continue
            prompt, output, start = aligned
            expected = max(int(prompt.size + output.size) - 1 - start, 0)
            if "routed_experts" in meta:
                routing = routing_from_value(meta.get("routed_experts"),
                                             meta.get("routed_experts_dtype"), payloads,
                                             geometry, expected)
            elif pos == 0:
                routing = routing_from_value(sglext.get("routed_experts"),
                                             sglext.get("routed_experts_dtype"), payloads,
                                             geometry, expected)
            else:
                routing = DecodeFault(
                    "missing_routing",
                    f"{sid} has no routing: SGLang's sglext carries the first choice's only; "
                    "request return_meta_info, or one request per sample",
                )
            out.append(A.build(
                sample_id=sid, index=index, prompt=prompt, output=output, start=start,
                routing=routing, engine=ctx.engine, group_id=group_id,
                policy_version=policy_version,
                logprobs=_first_present(O.choice_logprobs(choice),
                                        A.logprob_array(meta.get("output_token_logprobs"))),
                finish=A.finish_reason(choice.get("finish_reason") or meta.get("finish_reason")),
                weight_versions=A.weight_versions(meta or sglext, int(output.size)),
            ))
        return out

    def encode_routing(self, rows: np.ndarray, dtype: str | None = None) -> str:
        return encode_routing(rows, dtype)

    def decode_routing(self, value: Any, geometry: RoutingGeometry,
                       dtype: str | None = None) -> np.ndarray:
        return decode_routing(value, geometry, dtype)

    def encode_response(
        self, request: dict[str, Any], completions: Sequence[Completion], *,
        dtype: str | None = None,
    ) -> Any:
        """Choices with the first one's routing in ``sglext``; with ``return_meta_info``,
        each choice's in its ``meta_info``."""
        per_choice = bool(request.get("return_meta_info"))
        prompt = A.request_prompt(request)
        choice_list = []
        for i, c in enumerate(completions):
            choice = O.encode_choice(i, prompt, c)
            if per_choice:
                choice["meta_info"] = routing_meta(c.routing, dtype)
            choice_list.append(choice)
        resp = O.response(request, choice_list)
        if not per_choice and completions:
            ext = routing_meta(completions[0].routing, dtype)
            if ext:
                resp["sglext"] = ext
        return resp


def _first_present(*arrays: np.ndarray | None) -> np.ndarray | None:
    return next((a for a in arrays if a is not None), None)
