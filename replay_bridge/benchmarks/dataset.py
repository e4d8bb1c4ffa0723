"""``bench dataset``: open time and one rank's read throughput against dataset size, on a local
directory and on an S3-compatible server on loopback, side by side.

A trainer rank opens the dataset (manifests + compact indexes, no shard) and reads its share
(every ``ranks``-th sample); the opening must not grow with the dataset (target: the largest
dataset opens within 2x of the smallest), and the rank must fetch only the record batches that
hold its samples.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import RoutedSample
from ..shards import ShardReader, ShardWriter
from .routing_model import RoutingModel

__all__ = ["run", "s3_loopback"]

_POOL = 1024


@contextlib.contextmanager
def s3_loopback(bucket: str = "bench") -> Iterator[str]:
    """An S3-compatible server (``moto``) on a loopback port for the length of the block;
    yields ``s3://bucket``. The AWS variables of this process point at it meanwhile."""
    try:
        import moto  # noqa: F401
    except ImportError:
        raise RuntimeError("the S3 side needs moto's server: pip install 'moto[server]' "
                           "(or pass --no-s3)") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the S3 loopback server did not start") from None
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ENDPOINT_URL_S3=url,
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir(bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def _samples(geometry: RoutingGeometry, n: int, tokens: int, seed: int) -> list[RoutedSample]:
    """``n`` samples of ``tokens`` tokens; routing drawn once for a pool of distinct samples
    and reused (the bench measures opening and reading, not compression)."""
    model = RoutingModel(geometry, seed=seed)
    pool = model.routing(_POOL * (tokens - 1)).reshape(_POOL, tokens - 1,
                                                      geometry.num_moe_layers, geometry.top_k)
    toks = np.arange(tokens, dtype=np.int32)
    return [RoutedSample(f"s{i:07d}", toks, tokens // 2, group_id=f"g{i // 8}",
                         routed=pool[i % _POOL]) for i in range(n)]


def _write(uri: str, geometry: RoutingGeometry, samples: list[RoutedSample],
           batch_bytes: int) -> float:
    t = time.perf_counter()
    with ShardWriter(uri, geometry, samples_per_shard=1024, batch_bytes=batch_bytes) as w:
        for s in samples:
            w.add(s)
    return time.perf_counter() - t


def _rank_read(uri: str, ranks: int, opens: int = 3) -> dict[str, float]:
    """Open (best of ``opens``: a steady-state open, not the first touch of a cold file),
    pick rank 0's share from the index, read it; seconds of each step."""
    best = float("inf")
    for _ in range(opens):
        t0 = time.perf_counter()
        reader = ShardReader(uri)
        best = min(best, time.perf_counter() - t0)
    t1 = time.perf_counter()
    ids = reader.index.column("sample_id")[0::ranks].to_pylist()
    t2 = time.perf_counter()
    got = reader.read(ids)
    acc = 0
    for s in got:
        acc |= int(s.routed.max())
    t3 = time.perf_counter()
    return {"open_s": best, "plan_s": t2 - t1, "read_s": t3 - t2,
            "samples": len(got), "bytes": sum(s.routed.nbytes for s in got)}


def run(sizes: tuple[int, ...] = (1_000, 10_000, 100_000), tokens: int = 16, ranks: int = 64,
        samples_per_batch: int = 4, preset: str = "qwen3-30b-a3b", repeats: int = 5,
        s3: bool = True, workdir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Write one dataset per size on each backend, then time (interleaved, ``repeats``
    rounds, medians) what one of ``ranks`` trainer ranks does: open, plan, read its share."""
    geometry = RoutingGeometry.from_preset(preset)
    samples = _samples(geometry, max(sizes), tokens, seed)
    batch_bytes = samples_per_batch * samples[0].routed.nbytes
    root = Path(tempfile.mkdtemp(prefix="bench-dataset-", dir=workdir))
    stack = contextlib.ExitStack()
    try:
        backends = {"local": str(root)}
        if s3:
            backends["s3"] = stack.enter_context(s3_loopback())
        uris: dict[tuple[str, int], str] = {}
        write_s: dict[str, dict[int, float]] = {b: {} for b in backends}
        for backend, base in backends.items():
            for n in sizes:
                uri = uris[backend, n] = f"{base}/n{n}-{uuid.uuid4().hex[:6]}"
                write_s[backend][n] = _write(uri, geometry, samples[:n], batch_bytes)
        timings: dict[tuple[str, int], list[dict[str, float]]] = {k: [] for k in uris}
        for _ in range(repeats):  # interleaved: every case sees the same machine load
            for key, uri in uris.items():
                timings[key].append(_rank_read(uri, ranks))
        results = []
        for (backend, n), runs in timings.items():
            med = {k: float(np.median([r[k] for r in runs]))
                   for k in ("open_s", "plan_s", "read_s")}
            results.append({
                "backend": backend, "samples": n, "rank_samples": int(runs[0]["samples"]),
                "write_s": round(write_s[backend][n], 3),
                "open_ms": round(med["open_s"] * 1e3, 2),
                "plan_ms": round(med["plan_s"] * 1e3, 2),
                "rank_read_ms": round(med["read_s"] * 1e3, 2),
                "rank_read_mb_s": round(runs[0]["bytes"] / med["read_s"] / 1e6, 1),
                "rank_samples_per_s": round(runs[0]["samples"] / med["read_s"], 1),
            })
        ratios = {}
        for backend in backends:
            rows = {r["samples"]: r for r in results if r["backend"] == backend}
            small, large = rows[min(sizes)], rows[max(sizes)]
            ratios[backend] = {
                "open_largest_over_smallest": round(large["open_ms"] / small["open_ms"], 2),
                "open_and_plan_largest_over_smallest": round(
                    (large["open_ms"] + large["plan_ms"]) / (small["open_ms"] + small["plan_ms"]),
                    2),
            }
        return {
            "benchmark": "dataset",
            "geometry": geometry.to_dict(),
            "settings": {"sizes": list(sizes), "tokens_per_sample": tokens, "ranks": ranks,
                         "rank": "0: every ranks-th sample of the index", "repeats": repeats,
                         "samples_per_record_batch": samples_per_batch,
                         "samples_per_shard": 1024, "verify": "read (XXH3-64 per record batch)",
                         "timing": "median of interleaved rounds (open: best of 3 per round); "
                                   "local files in page cache; s3 = moto server on loopback"},
            "target": {"open_largest_over_smallest_max": 2.0},
            "results": results,
            "ratios": ratios,
            "meets_target": {b: r["open_largest_over_smallest"] <= 2.0
                             for b, r in ratios.items()},
        }
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
