"""Synthetic engine traffic for benchmarks: valid routing, SGLang response lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pybase64

from ..geometry import RoutingGeometry


def valid_routing(rng: np.random.Generator, rows: int, geometry: RoutingGeometry) -> np.ndarray:
    """``int32 [rows, num_layers, top_k]``: k distinct ids per MoE block, zeros for dense layers.

    Ids are ``(base + j * stride) % E`` with an odd stride, distinct for ``k <= E`` when ``E`` is a
    power of two; other expert counts fall back to stride 1.
    """
    e, k, layers = geometry.num_experts, geometry.top_k, geometry.num_layers
    base = rng.integers(0, e, size=(rows, layers, 1), dtype=np.int64)
    if e & (e - 1) == 0:
        stride = 2 * rng.integers(0, max(e // 2, 1), size=(rows, layers, 1), dtype=np.int64) + 1
    else:
        stride = np.ones((rows, layers, 1), dtype=np.int64)
    ids = ((base + np.arange(k, dtype=np.int64) * stride) % e).astype(np.int32)
    if not geometry.all_moe:
        ids[:, list(geometry.dense_layers), :] = 0
    return ids


def sglang_lines(
    geometry: RoutingGeometry, samples: int, prompt_len: int, completion_len: int, seed: int = 0
) -> Iterator[tuple[bytes, bytes]]:
    """``(jsonl_line, base64_payload)`` pairs of SGLang ``/generate`` traffic."""
    rng = np.random.default_rng(seed)
    vocab = 151_000
    for i in range(samples):
        prompt = rng.integers(0, vocab, prompt_len).tolist()
        output = rng.integers(0, vocab, completion_len).tolist()
        routing = valid_routing(rng, prompt_len + completion_len - 1, geometry)
        payload = pybase64.b64encode(routing.tobytes())
        line = orjson.dumps({
            "sample_id": f"s{i:06d}",
            "request": {"input_ids": prompt, "return_routed_experts": True,
                        "return_logprob": True,
                        "sampling_params": {"max_new_tokens": completion_len}},
            "response": {
                "text": "",
                "output_ids": output,
                "meta_info": {
                    "id": f"req-{i}",
                    "prompt_tokens": prompt_len,
                    "completion_tokens": completion_len,
                    "finish_reason": {"type": "length", "length": completion_len},
                    "output_token_logprobs": [[-1.0, t, None] for t in output[:4]],
                    "weight_version": "0",
                    "routed_experts": payload.decode(),
                },
            },
        })
        yield line, payload


def write_sglang_jsonl(path: Path, geometry: RoutingGeometry, samples: int, prompt_len: int,
                       completion_len: int, seed: int = 0) -> list[bytes]:
    """Write the traffic to ``path``; return the base64 payloads (for the decode floor)."""
    payloads = []
    with open(path, "wb") as f:
        for line, payload in sglang_lines(geometry, samples, prompt_len, completion_len, seed):
            f.write(line + b"\n")
            payloads.append(payload)
    return payloads
