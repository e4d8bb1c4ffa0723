"""SGLang's native ``POST /generate``: token ids in, ``meta_info.routed_experts`` out.

Routing is base64 of raw little-endian ids, C order ``[rows, num_layers, top_k]``, in
``routed_experts_dtype`` (int32 when absent); rows start at the request's
``routed_experts_start_len``. One request per sample, so that each goes through a PD router's
merge (:func:`splice_routing`); batched requests (``input_ids`` a list of prompts, or
``sampling_params.n`` > 1) are decoded too, one sample per item of the answer's list, but a PD
router does not merge them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pybase64

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample, short_repr, type_name
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
    """An SGLang ``routed_experts`` value (base64 of raw ids, or a JSON list of integers) as
    blocks, or the fault."""
    if value is None:
        return DecodeFault("missing_routing", _MISSING)
    if isinstance(value, list):
        try:
            arr = A.int_array(value, "routed_experts")
        except A.BadField as e:
            return DecodeFault("malformed", str(e))
        return A.flat_to_blocks(arr.reshape(-1).tobytes(), "<i8", geometry, expected_rows)
    dtype = SGLANG_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else \
        SGLANG_DTYPES["int32"] if dtype_name is None else None
    if dtype is None:
        return DecodeFault("malformed", f"unknown routed_experts_dtype {short_repr(dtype_name)};"
                           f" one of {', '.join(SGLANG_DTYPES)}")
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


class SGLangRouting:
    """SGLang's ``routed_experts`` value (base64 of raw ids in ``routed_experts_dtype``), for
    every SGLang protocol."""

    def encode_routing(self, rows: np.ndarray, dtype: str | None = None) -> str:
        return encode_routing(rows, dtype)

    def decode_routing(self, value: Any, geometry: RoutingGeometry,
                       dtype: str | None = None) -> np.ndarray:
        return decode_routing(value, geometry, dtype)


class SGLangGenerate(SGLangRouting, Protocol):
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

    def samples_asked(self, request: dict[str, Any]) -> int:
        shape = _batch(request)
        return 1 if isinstance(shape, str) else len(shape[0]) * shape[1]

    def decode(
        self, request: dict[str, Any], response: Any, payloads: Payloads,
        geometry: RoutingGeometry, sample_id: str, group_id: str | None = None,
        policy_version: int | None = None,
    ) -> list[WireSample]:
        """One sample per asked-for sample: the answer object, or each item of the answer's
        list (``<sample_id>/<i>`` and index ``i``) for a batched request or ``n`` > 1. An
        answer of another shape or length is ``malformed`` for every asked-for sample."""
        ctx = A.Context(self.name, group_id, policy_version)
        shape = _batch(request)
        if isinstance(shape, str):
            return [ctx.failed(sample_id, "malformed", shape)]
        prompts, n, batched = shape
        asked = len(prompts) * n
        if not (batched or n > 1):
            if isinstance(response, list):
                return [ctx.failed(sample_id, "malformed", f"the answer is a list of "
                                   f"{len(response)} items, but the request asks for one sample "
                                   "(one prompt, n = 1)")]
            return [self._item(ctx, request, response, prompts[0], payloads, geometry,
                               sample_id, 0, "the answer")]
        why = f"{asked} samples asked for ({len(prompts)} prompts x n={n})"
        if not isinstance(response, list):
            return ctx.all_failed(sample_id, asked, f"the answer is {type_name(response)}; "
                                  f"expected a list of {why}")
        if len(response) != asked:
            return ctx.all_failed(sample_id, asked, f"the answer holds {len(response)} items "
                                  f"for {why}")
        return [self._item(ctx, request, item, prompts[i // n], payloads, geometry,
                           f"{sample_id}/{i}", i, f"item {i} of the answer")
                for i, item in enumerate(response)]

    def _item(
        self, ctx: A.Context, request: dict[str, Any], item: Any, prompt_ids: Any,
        payloads: Payloads, geometry: RoutingGeometry, sid: str, index: int, what: str,
    ) -> WireSample:
        try:
            if not isinstance(item, dict):
                raise A.BadField(f"{what} is {type_name(item)}, expected an object")
            meta = A.as_object(item.get("meta_info"), "meta_info")
            prompt, output, start = A.align(
                request, A.first_present(prompt_ids, item.get("prompt_token_ids")),
                A.first_present(item.get("output_ids"), meta.get("output_ids")), START_FIELD)
            logprobs = A.logprob_array(meta.get("output_token_logprobs"),
                                       "output_token_logprobs", int(output.size), "triples")
            finish = A.finish_reason(meta.get("finish_reason"))
            versions = A.weight_versions(meta, int(output.size))
        except A.BadField as e:
            return ctx.failed(sid, "malformed", str(e), index=index)
        expected = max(int(prompt.size + output.size) - 1 - start, 0)
        routing = routing_from_value(meta.get("routed_experts"), meta.get("routed_experts_dtype"),
                                     payloads, geometry, expected)
        return A.build(
            sample_id=sid, index=index, prompt=prompt, output=output, start=start,
            routing=routing, engine=ctx.engine, group_id=ctx.group_id,
            policy_version=ctx.policy_version, logprobs=logprobs, finish=finish,
            weight_versions=versions,
            extra={k: meta[k] for k in ("id", "cached_tokens") if k in meta},
        )

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


def _batch(request: dict[str, Any]) -> tuple[list[Any], int, bool] | str:
    """``(prompts, n, batched)`` of a ``/generate`` request (a prompt is ``None`` when sent as
    text), or what is wrong with it."""
    inputs, text = request.get("input_ids"), request.get("text")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], list):
        prompts, batched = inputs, True
    elif inputs is None and isinstance(text, list):
        prompts, batched = [None] * min(len(text), A.MAX_SAMPLES + 1), True
    else:
        prompts, batched = [inputs], False
    params = request.get("sampling_params")
    n = 1 if not isinstance(params, dict) else params.get("n", 1)
    if params is not None and not isinstance(params, dict):
        return f"sampling_params is {type_name(params)}, expected an object"
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= A.MAX_SAMPLES:
        return f"sampling_params n={short_repr(n)} is not an integer in [1, {A.MAX_SAMPLES}]"
    if not 1 <= len(prompts) * n <= A.MAX_SAMPLES:
        return (f"the request asks for {len(prompts)} prompts x n={n} samples; at most "
                f"{A.MAX_SAMPLES} are read from one answer")
    return prompts, n, batched
