"""vLLM OpenAI completions / chat: ``choices[i].routed_experts`` as base64 ``.npy``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample
from . import _assemble as A
from ._npy import parse_npy
from ._payload import Payloads

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
            gen = np.asarray(value, dtype=np.int64)
            prompt_part = response.get("prompt_routed_experts")
            if prompt_part is not None:
                pr = np.asarray(prompt_part, dtype=np.int64)
                gen = np.concatenate([pr, gen]) if gen.size else pr
        except (TypeError, ValueError, OverflowError):
            return DecodeFault("malformed", "routed_experts is a list but not a regular int array")
        return gen
    try:
        return parse_npy(payloads.decode(value))
    except ValueError as e:
        return DecodeFault("malformed", f"routed_experts: {e}")


def decode_completions(
    request: dict[str, Any], response: Any, payloads: Payloads, geometry: RoutingGeometry,
    sample_id: str, group_id: str | None = None, policy_version: int | None = None,
) -> list[WireSample]:
    """One sample per choice, ``<sample_id>/<index>`` when there are several."""
    ctx = A.Context("vllm", group_id, policy_version)
    out = []
    for _, sid, choice in A.choices(ctx, request, response, sample_id):
        if isinstance(choice, WireSample):
            out.append(choice)
            continue
        prompt_ids = A.request_prompt(request) or (
            choice.get("prompt_token_ids") or response.get("prompt_token_ids"))
        aligned = A.align(ctx, sid, request, prompt_ids, choice.get("token_ids"),
                          "routed_experts_prompt_start")
        if isinstance(aligned, WireSample):
            out.append(aligned)
            continue
        prompt, output, start = aligned
        out.append(A.build(
            sample_id=sid, prompt=prompt, output=output, start=start,
            routing=_routing(choice, response, payloads), engine=ctx.engine,
            group_id=group_id, policy_version=policy_version,
            logprobs=A.choice_logprobs(choice), finish=A.finish_reason(choice.get("finish_reason")),
        ))
    return out
