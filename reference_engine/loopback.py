"""A light responder that speaks the engines' wire formats with synthetic routing.

For load tests and ``bench collect``: no model runs; completions and routing are deterministic
functions of the tokens, so a test can recompute what must have been stored
(:func:`synthetic_routing`). Run it in its own process with
``python -m reference_engine.loopback --engine sglang --model tiny-qwen3-moe --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, get_protocol

__all__ = ["loopback_app", "synthetic_completion", "synthetic_routing"]

VOCAB = 50_000


def synthetic_completion(prompt: np.ndarray, n: int, choice: int = 0) -> np.ndarray:
    """``n`` completion token ids for ``prompt`` (choice ``choice`` of a group)."""
    seed = int(prompt.sum()) * 31 + int(prompt.shape[0]) * 7 + choice * 1009
    return ((seed + np.arange(1, n + 1, dtype=np.int64) * 7919) % VOCAB).astype(np.int32)


def synthetic_routing(tokens: np.ndarray, geometry: RoutingGeometry, start: int = 0) -> np.ndarray:
    """Routing of positions ``[start, len(tokens) - 1)`` as ``int32 [rows, num_layers, top_k]``:
    k distinct ids per MoE layer block from a hash of (token, position, layer), so that
    compression is not flattered by structure; zeros for dense layers."""
    t = np.asarray(tokens, np.uint64)[start : max(len(tokens) - 1, start)]
    pos = np.arange(start, start + t.shape[0], dtype=np.uint64)
    e, k, layers = geometry.num_experts, geometry.top_k, geometry.num_layers
    x = (t[:, None] * np.uint64(0x9E3779B97F4A7C15) + pos[:, None] * np.uint64(0xBF58476D1CE4E5B9)
         + np.arange(layers, dtype=np.uint64)[None, :] * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xD6E8FEB86659FD93)
    x ^= x >> np.uint64(29)
    max_gap = np.uint64(max((e - 1) // k, 1))
    ids = np.empty((t.shape[0], layers, k), np.int64)
    ids[:, :, 0] = (x % np.uint64(e)).astype(np.int64)
    for j in range(1, k):  # k gaps in [1, max_gap]: the k ids stay distinct modulo e
        gap = (x >> np.uint64(8 + 6 * j)) % max_gap + np.uint64(1)
        ids[:, :, j] = ids[:, :, j - 1] + gap.astype(np.int64)
    out = (ids % e).astype(np.int32)
    dense = list(geometry.dense_layers)
    if dense:
        out[:, dense, :] = 0
    return out


def loopback_app(engine: str, geometry: RoutingGeometry, *, delay: float = 0.0,
                 zero_routing: bool = False) -> web.Application:
    """An aiohttp app answering ``/generate`` (``sglang``) or ``/v1/completions`` (``vllm``,
    ``sglang-openai``) with synthetic completions and routing, after ``delay`` seconds.
    ``zero_routing`` answers with all-zero routing (a capture that never happened: every
    sample is rejected). ``GET /stats`` counts requests served, in flight now and at most."""
    protocol = get_protocol(engine)
    wire_dtype = "uint8" if geometry.num_experts <= 256 else "uint16"  # vLLM's .npy dtype

    def one(prompt: np.ndarray, max_new: int, start: int, choice: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
        out = synthetic_completion(prompt, max_new, choice)
        if zero_routing:
            rows = max(prompt.size + out.size - 1 - start, 0)
            return out, np.zeros((rows, geometry.num_layers, geometry.top_k), np.int32)
        return out, synthetic_routing(np.concatenate([prompt, out]), geometry, start)

    served = 0  # single requests: each gets its own completion, as sampling would

    async def generate(request: web.Request) -> web.Response:
        nonlocal served
        body = orjson.loads(await request.read())
        served += 1
        if delay:
            await asyncio.sleep(delay)
        sp = body.get("sampling_params") or {}
        max_new = int(sp.get("max_new_tokens", 16))
        start = int(protocol.requested_start(body))
        inputs = body["input_ids"]
        batched = bool(inputs) and isinstance(inputs[0], list)
        completions = []
        for i, ids in enumerate(inputs if batched else [inputs]):
            prompt = np.asarray(ids, np.int32)
            seed = sp.get("sampling_seed")
            choice = i if batched else (served if seed is None else int(seed))
            out, routing = one(prompt, max_new, start, choice)
            completions.append(Completion(
                out, routing if body.get("return_routed_experts") else None,
                logprobs=np.full(out.size, -1.0), meta={"id": f"loop-{i}"}))
        return web.Response(body=orjson.dumps(protocol.encode_response(body, completions)),
                            content_type="application/json")

    async def completions(request: web.Request) -> web.Response:
        nonlocal served
        body = orjson.loads(await request.read())
        if delay:
            await asyncio.sleep(delay)
        prompt = np.asarray(body["prompt"], np.int32)
        max_new = int(body.get("max_tokens", 16))
        n = int(body.get("n", 1) or 1)
        start = int(protocol.requested_start(body))
        served += 1
        first = served * 1000 if body.get("seed") is None else int(body["seed"])
        # vLLM always returns routing; SGLang when asked (for the first choice, in sglext).
        routed = engine == "vllm" or bool(body.get("return_routed_experts"))
        completions = []
        for i in range(n):
            out, routing = one(prompt, max_new, start, first + i)
            completions.append(Completion(out, routing if routed else None,
                                          logprobs=np.full(out.size, -1.0)))
        resp = protocol.encode_response(body, completions,
                                        dtype=wire_dtype if engine == "vllm" else None)
        return web.Response(body=orjson.dumps(resp), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    stats = {"served": 0, "in_flight": 0, "peak_in_flight": 0}

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        stats["in_flight"] += 1
        stats["peak_in_flight"] = max(stats["peak_in_flight"], stats["in_flight"])
        try:
            return await handler(request)
        finally:
            stats["in_flight"] -= 1
            stats["served"] += 1

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=1 << 30, middlewares=[count])
    app.router.add_get("/health", health)
    app.router.add_get("/stats", get_stats)
    if engine == "sglang":
        app.router.add_post("/generate", generate)
    else:
        app.router.add_post("/v1/completions", completions)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", default="sglang", choices=["sglang", "sglang-openai", "vllm"])
    ap.add_argument("--model", default="tiny-qwen3-moe", help="geometry: preset or model dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--zero-routing", action="store_true",
                    help="answer with all-zero routing (every sample is rejected)")
    args = ap.parse_args(argv)
    geometry = RoutingGeometry.resolve(args.model)
    app = loopback_app(args.engine, geometry, delay=args.delay, zero_routing=args.zero_routing)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
