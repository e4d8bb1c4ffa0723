"""Engine-side traffic for tests: what SGLang and vLLM put on the wire, built with the
protocols' own encoders (``Protocol.plan`` for the request, ``Protocol.encode_response`` for
the answer). Tests that pin the wire bytes encode by hand instead (``test_protocols.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, SamplingParams, get_protocol


def routing(rng: np.random.Generator, rows: int, g: RoutingGeometry) -> np.ndarray:
    """Valid ``int32 [rows, num_layers, top_k]``: k distinct ids per MoE block, dense zeros."""
    keys = rng.random((rows, g.num_layers, g.num_experts))
    ids = np.argsort(keys, axis=-1)[..., : g.top_k].astype(np.int32)
    ids[:, list(g.dense_layers), :] = 0
    return ids


def sglang_generate(prompt: list[int], output: list[int], r: np.ndarray | None,
                    dtype: str | None = None, start: int = 0, pretty: bool = False
                    ) -> tuple[dict[str, Any], bytes]:
    """A ``/generate`` request and its answer (``r``: rows from ``start``; ``None``: none)."""
    protocol = get_protocol("sglang")
    (call,) = protocol.plan(prompt, ["s"], SamplingParams(max(len(output), 1)),
                            routed_start=start)
    body = protocol.encode_response(call.payload, [Completion(
        output, r, logprobs=[-0.25] * len(output), finish_reason="stop")], dtype=dtype)
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2) if pretty else orjson.dumps(body)
    return call.payload, raw


def vllm_completion(prompt: list[int], outputs: list[list[int]], rs: list[np.ndarray | None],
                    dtype: str, start: int = 0) -> tuple[dict[str, Any], bytes]:
    """A vLLM completions request for ``len(outputs)`` choices and its answer."""
    protocol = get_protocol("vllm")
    (call,) = protocol.plan(prompt, [f"s/{i}" for i in range(len(outputs))],
                            SamplingParams(max((len(o) for o in outputs), default=1)),
                            routed_start=start)
    body = protocol.encode_response(call.payload, [
        Completion(out, r, logprobs=[-0.5] * len(out)) for out, r in zip(outputs, rs)],
        dtype=dtype)
    return call.payload, orjson.dumps(body)
