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
             prompt_rows: int) -> np.ndarray | DecodeFault:
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
    engine = "vllm"
    if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
        return [A.failed(sample_id, "malformed", "response has no choices list", engine,
                         group_id, policy_version)]
    choices = response["choices"]
    many = len(choices) > 1 or int(request.get("n", 1) or 1) > 1
    out = []
    for pos, choice in enumerate(choices):
        idx = choice.get("index", pos) if isinstance(choice, dict) else pos
        sid = f"{sample_id}/{idx}" if many else sample_id
        if not isinstance(choice, dict):
            out.append(A.failed(sid, "malformed", "choice is not an object", engine, group_id,
                                policy_version))
            continue
        prompt_ids = request.get("prompt")
        if not (isinstance(prompt_ids, list) and prompt_ids and isinstance(prompt_ids[0], int)):
            prompt_ids = choice.get("prompt_token_ids") or response.get("prompt_token_ids")
        try:
            prompt = A.token_array(prompt_ids, "prompt token ids")
            output = A.token_array(choice.get("token_ids"), "choices[].token_ids")
        except ValueError as e:
            out.append(A.failed(sid, "malformed", str(e), engine, group_id, policy_version))
            continue
        if prompt.size == 0:
            out.append(A.failed(sid, "malformed", "no prompt token ids (send token ids and "
                                "return_token_ids)", engine, group_id, policy_version))
            continue
        start = A.start_offset(request, "routed_experts_prompt_start", int(prompt.size))
        if isinstance(start, str):
            out.append(A.failed(sid, "malformed", start, engine, group_id, policy_version, prompt))
            continue
        lp = choice.get("logprobs")
        lp_values = (lp.get("token_logprobs") or lp.get("content")) if isinstance(lp, dict) else None
        out.append(A.build(
            sample_id=sid, prompt=prompt, output=output, start=start,
            routing=_routing(choice, response, payloads, int(prompt.size) - start),
            engine=engine, group_id=group_id, policy_version=policy_version,
            logprobs=A.logprob_array(lp_values), finish=A.finish_reason(choice.get("finish_reason")),
        ))
    return out
