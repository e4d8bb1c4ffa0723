"""SGLang's OpenAI endpoints (``/v1/completions``, ``/v1/chat/completions``) with ``sglext``.

Routing is encoded as for ``/generate`` (:mod:`._sglang_generate`). It comes back at the
response-level ``sglext.routed_experts``, which SGLang fills for the first choice only, or per
choice in ``choices[i].meta_info`` when the request sets ``return_meta_info``. So the plan is
one request per sample, ``n = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample, type_name
from . import _assemble as A
from . import _openai as O
from ._base import Completion, EngineCall, SamplingParams, token_list
from ._payload import Payloads
from ._sglang_generate import START_FIELD, SGLangRouting, routing_from_value, routing_meta

__all__ = ["SGLangOpenAI"]


class SGLangOpenAI(SGLangRouting, O.OpenAIProtocol):
    """SGLang ``POST /v1/completions`` (chat: ``/v1/chat/completions``): one request per
    sample, ``n = 1``."""

    name = "sglang-openai"
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
        sglext = response.get("sglext") if isinstance(response, dict) else None
        if sglext is not None and not isinstance(sglext, dict):
            return ctx.all_failed(sample_id, self.samples_asked(request),
                                  f"sglext is {type_name(sglext)}, expected an object")
        sglext = sglext or {}
        out = []
        for pos, index, sid, choice in O.choices(ctx, request, response, sample_id):
            if isinstance(choice, WireSample):
                out.append(choice)
                continue
            try:
                meta = A.as_object(choice.get("meta_info"), "meta_info")
                prompt_ids = A.first_present(
                    A.request_prompt(request), choice.get("prompt_token_ids"),
                    response.get("prompt_token_ids"), meta.get("prompt_token_ids"),
                    sglext.get("prompt_token_ids"))
                output_ids = A.first_present(choice.get("token_ids"), choice.get("output_ids"),
                                             meta.get("output_ids"))
                prompt, output, start = A.align(request, prompt_ids, output_ids, START_FIELD)
                completion = int(output.size)
                logprobs = O.choice_logprobs(choice, completion)
                if logprobs is None:
                    logprobs = A.logprob_array(meta.get("output_token_logprobs"),
                                               "meta_info.output_token_logprobs", completion,
                                               "triples")
                finish = A.finish_reason(A.first_present(choice.get("finish_reason"),
                                                         meta.get("finish_reason")))
                versions = A.weight_versions(meta or sglext, completion)
            except A.BadField as e:
                out.append(ctx.failed(sid, "malformed", str(e), index=index))
                continue
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
                policy_version=policy_version, logprobs=logprobs, finish=finish,
                weight_versions=versions,
            ))
        return out

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

