"""SGLang: native ``/generate`` (single and batched) and the OpenAI endpoints (``sglext``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample
from . import _assemble as A
from ._payload import Payloads

_MISSING = (
    "the response carries no routed_experts (server without --enable-return-routed-experts, "
    "request without return_routed_experts, or a router that dropped the field)"
)


def routing_from_value(
    value: Any, dtype_name: Any, payloads: Payloads, geometry: RoutingGeometry, expected_rows: int
) -> np.ndarray | DecodeFault:
    """An SGLang ``routed_experts`` value (base64 of raw ids, or a JSON list) as blocks."""
    if value is None:
        return DecodeFault("missing_routing", _MISSING)
    if isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            return DecodeFault("malformed", "routed_experts is a list but not a regular array of ints")
        return A.flat_to_blocks(arr.reshape(-1).tobytes(), "<i8", geometry, expected_rows)
    dtype = A.SGLANG_DTYPES.get(str(dtype_name or "int32"))
    if dtype is None:
        return DecodeFault("malformed", f"unknown routed_experts_dtype {dtype_name!r}")
    try:
        raw = payloads.decode(value)
    except ValueError as e:
        return DecodeFault("malformed", f"routed_experts: {e}")
    return A.flat_to_blocks(raw, dtype, geometry, expected_rows)


def decode_generate(
    request: dict[str, Any], response: Any, payloads: Payloads, geometry: RoutingGeometry,
    sample_id: str, group_id: str | None = None, policy_version: int | None = None,
) -> list[WireSample]:
    """``POST /generate``: one sample per response item (``<sample_id>/<i>`` when batched)."""
    ctx = A.Context("sglang", group_id, policy_version)
    inputs = request.get("input_ids")
    batched = isinstance(response, list)
    items = response if batched else [response]
    prompts: list[Any]
    if batched:
        if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], list):
            prompts = [None]
        else:
            prompts = inputs
        if len(items) % len(prompts):
            msg = f"batched response has {len(items)} items for {len(prompts)} prompts"
            return [ctx.failed(f"{sample_id}/{i}", "malformed", msg) for i in range(len(items))]
        per_prompt = len(items) // len(prompts)
    else:
        prompts, per_prompt = [inputs], 1
    out = []
    for i, item in enumerate(items):
        sid = f"{sample_id}/{i}" if batched else sample_id
        out.append(_generate_item(ctx, request, item, prompts[i // per_prompt], payloads,
                                  geometry, sid))
    return out


def _generate_item(
    ctx: A.Context, request: dict[str, Any], item: Any, prompt_ids: Any, payloads: Payloads,
    geometry: RoutingGeometry, sid: str,
) -> WireSample:
    if not isinstance(item, dict):
        return ctx.failed(sid, "malformed", f"response item is {type(item).__name__}, expected "
                          "an object")
    meta = item.get("meta_info") or {}
    aligned = A.align(ctx, sid, request,
                      prompt_ids if prompt_ids is not None else item.get("prompt_token_ids"),
                      item.get("output_ids", meta.get("output_ids")), "routed_experts_start_len")
    if isinstance(aligned, WireSample):
        return aligned
    prompt, output, start = aligned
    expected = max(int(prompt.size + output.size) - 1 - start, 0)
    routing = routing_from_value(meta.get("routed_experts"), meta.get("routed_experts_dtype"),
                                 payloads, geometry, expected)
    return A.build(
        sample_id=sid, prompt=prompt, output=output, start=start, routing=routing,
        engine=ctx.engine, group_id=ctx.group_id, policy_version=ctx.policy_version,
        logprobs=A.logprob_array(meta.get("output_token_logprobs")),
        finish=A.finish_reason(meta.get("finish_reason")),
        weight_versions=A.weight_versions(meta, int(output.size)),
        extra={k: meta[k] for k in ("id", "cached_tokens") if k in meta},
    )


def decode_openai(
    request: dict[str, Any], response: Any, payloads: Payloads, geometry: RoutingGeometry,
    sample_id: str, group_id: str | None = None, policy_version: int | None = None,
) -> list[WireSample]:
    """``/v1/completions`` and ``/v1/chat/completions`` with ``sglext``.

    Routing comes from ``choices[i].meta_info.routed_experts`` when the request set
    ``return_meta_info``, else from the response-level ``sglext.routed_experts``, which SGLang
    fills for the first choice only: later choices without ``meta_info`` get ``missing_routing``.
    """
    ctx = A.Context("sglang-openai", group_id, policy_version)
    sglext = (response.get("sglext") if isinstance(response, dict) else None) or {}
    out = []
    for pos, sid, choice in A.choices(ctx, request, response, sample_id):
        if isinstance(choice, WireSample):
            out.append(choice)
            continue
        meta = choice.get("meta_info") or {}
        prompt_ids = A.request_prompt(request) or (
            choice.get("prompt_token_ids") or response.get("prompt_token_ids")
            or meta.get("prompt_token_ids") or sglext.get("prompt_token_ids"))
        output_ids = next((v for v in (choice.get("token_ids"), choice.get("output_ids"),
                                       meta.get("output_ids")) if v is not None), None)
        aligned = A.align(ctx, sid, request, prompt_ids, output_ids, "routed_experts_start_len")
        if isinstance(aligned, WireSample):
            out.append(aligned)
            continue
        prompt, output, start = aligned
        expected = max(int(prompt.size + output.size) - 1 - start, 0)
        if "routed_experts" in meta:
            routing = routing_from_value(meta.get("routed_experts"),
                                         meta.get("routed_experts_dtype"), payloads, geometry,
                                         expected)
        elif pos == 0:
            routing = routing_from_value(sglext.get("routed_experts"),
                                         sglext.get("routed_experts_dtype"), payloads, geometry,
                                         expected)
        else:
            routing = DecodeFault(
                "missing_routing",
                f"{sid} has no routing: SGLang's sglext carries the first choice's only; "
                "request return_meta_info, or one request per sample",
            )
        out.append(A.build(
            sample_id=sid, prompt=prompt, output=output, start=start, routing=routing,
            engine=ctx.engine, group_id=group_id, policy_version=policy_version,
            logprobs=_first_present(A.choice_logprobs(choice),
                                    A.logprob_array(meta.get("output_token_logprobs"))),
            finish=A.finish_reason(choice.get("finish_reason") or meta.get("finish_reason")),
            weight_versions=A.weight_versions(meta or sglext, int(output.size)),
        ))
    return out


def _first_present(*arrays: np.ndarray | None) -> np.ndarray | None:
    return next((a for a in arrays if a is not None), None)
