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

    Each block is a random base plus cumulative random gaps (k distinct ids, about as much
    entropy as a random k-subset), in one of 64 random orders, so that compression figures are
    not flattered by structure real routing lacks.
    """
    e, k, layers = geometry.num_experts, geometry.top_k, geometry.num_layers
    max_gap = max((e - 1) // k, 1)
    base = rng.integers(0, e, size=(rows * layers, 1), dtype=np.int32)
    gaps = rng.integers(1, max_gap + 1, size=(rows * layers, k), dtype=np.int32)
    gaps[:, 0] = 0
    ids = (base + np.cumsum(gaps, axis=1, dtype=np.int32)) % e
    orders = np.stack([rng.permutation(k) for _ in range(64)])
    pick = orders[rng.integers(0, 64, size=rows * layers)]
    ids = np.take_along_axis(ids, pick, axis=1).reshape(rows, layers, k)
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
