"""``bench shards``: size and speed of each shard compression on one realistic data set."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..inspection import expert_load
from ..sample import RoutedSample
from ..shards import ShardReader, ShardWriter
from .routing_model import RoutingModel

__all__ = ["DEFAULT_VARIANTS", "bench_shards", "synthetic_samples"]

# (label, compression, level)
DEFAULT_VARIANTS: tuple[tuple[str, str, int | None], ...] = (
    ("zstd", "zstd", None),  # Arrow's default zstd level (1): the writer's default
    ("zstd-3", "zstd", 3),
    ("zstd-9", "zstd", 9),
    ("lz4", "lz4", None),
    ("none", "none", None),
)
_VOCAB = 151_936


def synthetic_samples(geometry: RoutingGeometry, tokens: int, seed: int = 0
                      ) -> list[RoutedSample]:
    """RL-like samples totalling at least ``tokens`` tokens: prompts of 128-1024 tokens,
    completions of 128-3072, Zipf-distributed token ids, completion log-probs."""
    rng = np.random.default_rng(seed)
    model = RoutingModel(geometry, seed=seed)
    lengths: list[tuple[int, int]] = []
    total = 0
    while total < tokens:
        p, c = int(rng.integers(128, 1025)), int(rng.integers(128, 3073))
        lengths.append((p, c))
        total += p + c
    routing = model.routing(sum(p + c - 1 for p, c in lengths))
    ids = (rng.zipf(1.2, total) % _VOCAB).astype(np.int32)
    out, t, r = [], 0, 0
    for i, (p, c) in enumerate(lengths):
        n = p + c
        out.append(RoutedSample(
            sample_id=f"bench-{i:06d}", tokens=ids[t : t + n], prompt_len=p, routed_start=0,
            group_id=f"g{i // 8}", policy_version=1,
            logprobs=-rng.exponential(0.4, c).astype(np.float32), engine="bench",
            finish_reason="stop", routed=routing[r : r + n - 1],
        ))
        t, r = t + n, r + n - 1
    return out


def _best(fn, repeats: int) -> float:  # noqa: ANN001
    return min(fn() for _ in range(repeats))


def _read_all(directory: Path, threads: int | None = None) -> float:
    """Open (no checksums) and read every shard's routing as NumPy arrays, touching each."""
    t0 = time.perf_counter()
    reader = ShardReader(directory, verify=False)
    acc = 0
    for batch in reader.iter_batches(threads=threads):
        values = batch.column("routed").values.to_numpy(zero_copy_only=True)
        acc |= int(values.max())
    return time.perf_counter() - t0


def _lookups(reader: ShardReader, ids: list[str]) -> float:
    t0 = time.perf_counter()
    acc = 0
    for sid in ids:
        acc |= int(reader.routing(sid).max())
    return time.perf_counter() - t0


def bench_shards(
    tokens: int = 400_000,
    preset: str = "qwen3-30b-a3b",
    variants: tuple[tuple[str, str, int | None], ...] = DEFAULT_VARIANTS,
    samples_per_shard: int = 64,
    batch_bytes: int | None = None,
    repeats: int = 3,
    lookups: int = 200,
    seed: int = 0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Write the same samples with each variant and read them back, side by side."""
    geometry = RoutingGeometry.from_preset(preset)
    t0 = time.perf_counter()
    samples = synthetic_samples(geometry, tokens, seed)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(s.num_tokens for s in samples)
    routing_bytes = sum(s.routed.nbytes for s in samples)
    int32_per_token = geometry.wire_ids_per_token * 4
    load = expert_load(np.concatenate([s.routed.reshape(-1) for s in samples]), geometry)
    ratio = load.max(axis=1) / load.mean(axis=1)
    rng = np.random.default_rng(seed + 1)
    extra = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
    root = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=workdir))
    results = []
    try:
        dirs, write_s = {}, {}
        for label, compression, level in variants:
            d = dirs[label] = root / label

            def write(d: Path = d, compression: str = compression,
                      level: int | None = level) -> float:
                shutil.rmtree(d, ignore_errors=True)
                t = time.perf_counter()
                with ShardWriter(d, geometry, samples_per_shard=samples_per_shard,
                                 compression=compression, compression_level=level,
                                 **extra) as w:
                    for s in samples:
                        w.add(s)
                return time.perf_counter() - t

            write_s[label] = _best(write, repeats)
        order = ShardReader(dirs[variants[0][0]], verify=False).sample_ids()
        pick = [order[i] for i in rng.integers(0, len(order), lookups)]
        # Reads round-robin over the variants, so that each sees the same machine load.
        timings: dict[str, dict[str, list[float]]] = {
            label: {"read": [], "read1": [], "random": [], "seq": [], "open": []}
            for label, _, _ in variants}
        for _ in range(max(repeats, 3)):
            for label, _, _ in variants:
                d, t = dirs[label], timings[label]
                t["read"].append(_read_all(d))
                t["read1"].append(_read_all(d, threads=1))
                t["random"].append(_lookups(ShardReader(d, verify=False), pick))
                t["seq"].append(_lookups(ShardReader(d, verify=False), order))
                t0 = time.perf_counter()
                ShardReader(d, verify=True)
                t["open"].append(time.perf_counter() - t0)
        for label, compression, level in variants:
            reader = ShardReader(dirs[label], verify=False)
            t = {k: min(v) for k, v in timings[label].items()}
            picked_bytes = sum(reader.routing(s).nbytes for s in pick)
            size = reader.manifest.bytes
            results.append({
                "variant": label,
                "compression": compression,
                "level": level,
                "shards": len(reader.manifest.shards),
                "bytes": size,
                "bytes_per_token": round(size / n_tokens, 2),
                "ratio_to_int32": round(size / n_tokens / int32_per_token, 4),
                "write_mb_s": round(routing_bytes / write_s[label] / 1e6, 1),
                "read_routing_gb_s": round(routing_bytes / t["read"] / 1e9, 3),
                "read_routing_1thread_gb_s": round(routing_bytes / t["read1"] / 1e9, 3),
                "open_verified_s": round(t["open"], 3),
                "lookup_random_per_s": round(lookups / t["random"], 1),
                "lookup_random_gb_s": round(picked_bytes / t["random"] / 1e9, 3),
                "lookup_in_order_gb_s": round(routing_bytes / t["seq"] / 1e9, 3),
            })
    finally:
        shutil.rmtree(root, ignore_errors=True)
    target = int32_per_token / 4
    default = next(r for r in results if r["variant"] == "zstd") if any(
        r["variant"] == "zstd" for r in results) else None
    return {
        "benchmark": "shards",
        "geometry": geometry.to_dict(),
        "data": {
            "samples": len(samples),
            "tokens": n_tokens,
            "routing_bytes": routing_bytes,
            "stored_routing_bytes_per_token": geometry.ids_per_token
            * geometry.id_dtype.itemsize,
            "generate_s": round(gen_s, 2),
            "routing_model": "per-layer Zipf(s=0.5) expert popularity over a random expert "
                             "order; each slot keeps the previous token's expert with p=0.3; "
                             "k distinct ids per block",
            "load_max_over_mean": {"min": round(float(ratio.min()), 2),
                                   "mean": round(float(ratio.mean()), 2),
                                   "max": round(float(ratio.max()), 2)},
        },
        "settings": {"samples_per_shard": samples_per_shard,
                     "read_threads": ShardReader.default_read_threads(),
                     "batch_bytes": batch_bytes or ShardWriter.DEFAULT_BATCH_BYTES,
                     "repeats": repeats,
                     "lookups": lookups, "timing": "best of repeats (reads: at least 3, round-robin over the "
                               "variants); files in page cache"},
        "targets": {"bytes_per_token_max": target, "read_routing_gb_s_min": 1.0},
        "results": results,
        "meets_targets": {
            r["variant"]: {"size": r["bytes_per_token"] <= target,
                           "read": r["read_routing_gb_s"] >= 1.0}
            for r in results
        },
        "writer_default": {"compression": "zstd", "level": None,
                           "meets_targets": None if default is None else (
                               default["bytes_per_token"] <= target
                               and default["read_routing_gb_s"] >= 1.0)},
    }
