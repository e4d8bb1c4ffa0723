"""Engine-side encoders for tests: what SGLang and vLLM put on the wire."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pybase64

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import to_npy


def routing(rng: np.random.Generator, rows: int, g: RoutingGeometry) -> np.ndarray:
    """Valid ``int32 [rows, num_layers, top_k]``: k distinct ids per MoE block, dense zeros."""
    keys = rng.random((rows, g.num_layers, g.num_experts))
    ids = np.argsort(keys, axis=-1)[..., : g.top_k].astype(np.int32)
    ids[:, list(g.dense_layers), :] = 0
    return ids


def sglang_generate(prompt: list[int], output: list[int], r: np.ndarray | None,
                    dtype: str | None = None, start: int = 0, pretty: bool = False
                    ) -> tuple[dict[str, Any], bytes]:
    meta: dict[str, Any] = {"finish_reason": {"type": "stop"},
                            "output_token_logprobs": [[-0.25, t, None] for t in output]}
    if r is not None:
        arr = r.astype(np.dtype(dtype or "int32").newbyteorder("<"))
        meta["routed_experts"] = pybase64.b64encode(arr.tobytes()).decode()
        if dtype:
            meta["routed_experts_dtype"] = dtype
    req = {"input_ids": prompt, "return_routed_experts": True, "routed_experts_start_len": start}
    body = {"text": "", "output_ids": output, "meta_info": meta}
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2) if pretty else orjson.dumps(body)
    return req, raw


def vllm_completion(prompt: list[int], outputs: list[list[int]], rs: list[np.ndarray | None],
                    dtype: str, start: int = 0) -> tuple[dict[str, Any], bytes]:
    choices = []
    for i, (out, r) in enumerate(zip(outputs, rs)):
        c: dict[str, Any] = {"index": i, "text": "", "token_ids": out, "finish_reason": "length",
                             "logprobs": {"token_logprobs": [-0.5] * len(out)}}
        if r is not None:
            c["routed_experts"] = pybase64.b64encode(to_npy(r.astype(dtype))).decode()
        choices.append(c)
    req = {"prompt": prompt, "n": len(outputs), "return_token_ids": True,
           "routed_experts_prompt_start": start}
    return req, orjson.dumps({"id": "cmpl-1", "choices": choices})
