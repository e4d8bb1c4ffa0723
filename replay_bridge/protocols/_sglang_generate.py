"""SGLang's native ``POST /generate``: token ids in, ``meta_info.routed_experts`` out.

Routing is base64 of raw little-endian ids, C order ``[rows, num_layers, top_k]``, in
``routed_experts_dtype`` (int32 when absent); rows start at the request's
``routed_experts_start_len``. One request per sample, so that each goes through a PD router's
merge (:func:`splice_routing`); batched requests are decoded too (one sample per item) but a
PD router does not merge them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pybase64

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample
from . import _assemble as A
from ._base import Completion, EngineCall, Protocol, SamplingParams, token_list
from ._payload import Payloads

__all__ = ["SGLANG_DTYPES", "START_FIELD", "SGLangGenerate", "routing_from_value",
           "splice_routing"]

START_FIELD = "routed_experts_start_len"
"""SGLang's request field (``/generate`` and the OpenAI endpoints alike): the first token
position to return routing for."""

# SGLang's routed_experts_dtype values (int32 when absent).
SGLANG_DTYPES = {"int32": "<i4", "uint16": "<u2", "uint8": "u1", "int16": "<i2", "int64": "<i8"}

_MISSING = (
    "the response carries no routed_experts (server without --enable-return-routed-experts, "
    "request without return_routed_experts, or a router that dropped the field)"
)


def encode_routing(rows: np.ndarray, dtype: str | None = None) -> str:
    """``[rows, num_layers, top_k]`` ids -> base64 of the raw little-endian ids, C order, in
    SGLang dtype ``dtype`` (``int32`` when ``None``)."""
    wire = SGLANG_DTYPES.get(dtype or "int32")
    if wire is None:
        raise ValueError(f"unknown routed_experts_dtype {dtype!r}; one of "
                         f"{', '.join(SGLANG_DTYPES)}")
    return pybase64.b64encode(np.ascontiguousarray(rows, dtype=wire).tobytes()).decode("ascii")


def splice_routing(prefill_value: str, decode_value: str) -> str:
    """SGLang's PD merge of two ``routed_experts`` values: prefill's bytes, then decode's bytes
    past prefill's length (``ValueError`` when either is not base64)."""
    p = pybase64.b64decode(prefill_value, validate=True)
    d = pybase64.b64decode(decode_value, validate=True)
    return pybase64.b64encode(p + d[len(p):]).decode("ascii")


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
    dtype = SGLANG_DTYPES.get(str(dtype_name or "int32"))
    if dtype is None:
        return DecodeFault("malformed", f"unknown routed_experts_dtype {dtype_name!r}")
    try:
        raw = payloads.decode(value)
    except ValueError as e:
        return DecodeFault("malformed", f"routed_experts: {e}")
    return A.flat_to_blocks(raw, dtype, geometry, expected_rows)


def decode_routing(value: Any, geometry: RoutingGeometry, dtype: str | None = None) -> np.ndarray:
    """One ``routed_experts`` value as ``[rows, num_layers, top_k]`` (``ValueError`` with the
    decoder's message when it is not readable)."""
    blocks = routing_from_value(value, dtype, Payloads(), geometry, 0)
    if isinstance(blocks, DecodeFault):
        raise ValueError(blocks.message)
    return blocks


def routing_meta(rows: np.ndarray | None, dtype: str | None) -> dict[str, Any]:
    """The ``meta_info`` / ``sglext`` routing fields for ``rows`` (none when ``None``)."""
    if rows is None:
        return {}
    out: dict[str, Any] = {"routed_experts": encode_routing(rows, dtype)}
    if dtype is not None:
        out["routed_experts_dtype"] = dtype
    return out


def finish_object(c: Completion) -> dict[str, Any]:
    """SGLang's ``finish_reason`` object (``length`` carries the completion length)."""
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.output_ids)}
    return {"type": c.finish_reason}


class SGLangGenerate(Protocol):
    """SGLang ``POST /generate``: one request per sample."""

    name = "sglang"
    path = "/generate"
    chat_path = None
    start_field = START_FIELD

    def plan(
        self, input_ids: Sequence[int], sample_ids: Sequence[str], params: SamplingParams, *,
        model: str | None = None, routed_start: int = 0,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[EngineCall]:
        if messages is not None:
            raise ValueError("chat prompts (messages) need --engine sglang-openai or vllm")
        ids = token_list(input_ids)

        def generate(i: int) -> dict[str, Any]:
            sp = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                  "top_p": params.top_p, **params.extra}
            if params.seed is not None:
                sp["sampling_seed"] = params.seed + i
            return {
                "input_ids": ids,
                "sampling_params": sp,
                "return_routed_experts": True,
                START_FIELD: routed_start,
                "return_logprob": True,
            }

        return [EngineCall(self.path, generate(i), (sid,)) for i, sid in enumerate(sample_ids)]

    def decode(
        self, request: dict[str, Any], response: Any, payloads: Payloads,
        geometry: RoutingGeometry, sample_id: str, group_id: str | None = None,
        policy_version: int | None = None,
    ) -> list[WireSample]:
        """One sample per response item (``<sample_id>/<i>`` and index ``i`` when batched)."""
        ctx = A.Context(self.name, group_id, policy_version)
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
                return [ctx.failed(f"{sample_id}/{i}", "malformed", msg, index=i)
                        for i in range(len(items))]
            per_prompt = len(items) // len(prompts)
        else:
            prompts, per_prompt = [inputs], 1
        out = []
        for i, item in enumerate(items):
            sid = f"{sample_id}/{i}" if batched else sample_id
            out.append(self._item(ctx, request, item, prompts[i // per_prompt], payloads,
                                  geometry, sid, i))
        return out

    def _item(
        self, ctx: A.Context, request: dict[str, Any], item: Any, prompt_ids: Any,
        payloads: Payloads, geometry: RoutingGeometry, sid: str, index: int,
    ) -> WireSample:
        if not isinstance(item, dict):
            return ctx.failed(sid, "malformed", f"response item is {type(item).__name__}, "
                              "expected an object", index=index)
        meta = item.get("meta_info") or {}
        aligned = A.align(ctx, sid, request,
                          prompt_ids if prompt_ids is not None else item.get("prompt_token_ids"),
                          item.get("output_ids", meta.get("output_ids")), START_FIELD, index)
        if isinstance(aligned, WireSample):
            return aligned
        prompt, output, start = aligned
        expected = max(int(prompt.size + output.size) - 1 - start, 0)
        routing = routing_from_value(meta.get("routed_experts"), meta.get("routed_experts_dtype"),
                                     payloads, geometry, expected)
        return A.build(
            sample_id=sid, index=index, prompt=prompt, output=output, start=start,
            routing=routing, engine=ctx.engine, group_id=ctx.group_id,
            policy_version=ctx.policy_version,
            logprobs=A.logprob_array(meta.get("output_token_logprobs")),
            finish=A.finish_reason(meta.get("finish_reason")),
            weight_versions=A.weight_versions(meta, int(output.size)),
            extra={k: meta[k] for k in ("id", "cached_tokens") if k in meta},
        )

    def encode_routing(self, rows: np.ndarray, dtype: str | None = None) -> str:
        return encode_routing(rows, dtype)

    def decode_routing(self, value: Any, geometry: RoutingGeometry,
                       dtype: str | None = None) -> np.ndarray:
        return decode_routing(value, geometry, dtype)

    def encode_response(
        self, request: dict[str, Any], completions: Sequence[Completion], *,
        dtype: str | None = None,
    ) -> Any:
        """A ``/generate`` answer: one object, or a list of them for a batched request."""
        inputs = request.get("input_ids")
        batched = isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], list)
        prompts = inputs if batched else [inputs]
        per_prompt = max(len(completions) // max(len(prompts), 1), 1)
        items = []
        for i, c in enumerate(completions):
            out = token_list(c.output_ids)
            prompt = prompts[min(i // per_prompt, len(prompts) - 1)]
            meta: dict[str, Any] = {
                "prompt_tokens": len(prompt) if isinstance(prompt, list) else 0,
                "completion_tokens": len(out),
                "finish_reason": finish_object(c),
            }
            if c.logprobs is not None:
                lps = np.asarray(c.logprobs, np.float64).tolist()
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
            meta.update(c.meta)
            meta.update(routing_meta(c.routing, dtype))
            items.append({"text": "", "output_ids": out, "meta_info": meta})
        return items if batched else items[0]
