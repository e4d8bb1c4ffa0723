"""Synthetic engine traffic for benchmarks: valid routing, SGLang response lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from ..geometry import RoutingGeometry
from ..protocols import Completion, SamplingParams, get_protocol


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
    """``(jsonl_line, base64_payload)`` pairs of SGLang ``/generate`` traffic, encoded by the
    ``sglang`` protocol."""
    protocol = get_protocol("sglang")
    params = SamplingParams(max_new_tokens=completion_len)
    rng = np.random.default_rng(seed)
    vocab = 151_000
    for i in range(samples):
        prompt = rng.integers(0, vocab, prompt_len)
        output = rng.integers(0, vocab, completion_len)
        routing = valid_routing(rng, prompt_len + completion_len - 1, geometry)
        sample_id = f"s{i:06d}"
        (call,) = protocol.plan(prompt, [sample_id], params)
        response = protocol.encode_response(call.payload, [Completion(
            output, routing, logprobs=[-1.0] * min(4, completion_len),
            meta={"id": f"req-{i}", "weight_version": "0"})])
        line = orjson.dumps({"sample_id": sample_id, "request": call.payload,
                             "response": response})
        yield line, response["meta_info"]["routed_experts"].encode()


def write_sglang_jsonl(path: Path, geometry: RoutingGeometry, samples: int, prompt_len: int,
                       completion_len: int, seed: int = 0) -> list[bytes]:
    """Write the traffic to ``path``; return the base64 payloads (for the decode floor)."""
    payloads = []
    with open(path, "wb") as f:
        for line, payload in sglang_lines(geometry, samples, prompt_len, completion_len, seed):
            f.write(line + b"\n")
            payloads.append(payload)
    return payloads
