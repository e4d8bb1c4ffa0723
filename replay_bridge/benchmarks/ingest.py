"""``bench ingest``: ingest vs the base64 floor vs a typical peer chain, side by side."""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pybase64

from ..checks import scan_is_compiled
from ..geometry import RoutingGeometry
from ..ingest import ingest
from ..shards import Manifest
from .traffic import write_sglang_jsonl

_SPIN = "while True:\n    pass\n"


@contextmanager
def _one_core_busy():
    """Another process keeps one core busy (a Python spin loop) while the block runs: a busy
    rollout host."""
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        time.sleep(0.2)  # let it start spinning
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _cpu() -> float:
    """CPU seconds of this process so far, every thread included (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_ingest(path: Path, out: Path, geometry: RoutingGeometry, samples: int,
                  workers: int = 1) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one ingest into ``out``, which must store every
    sample (CPU of this process only: with ``workers`` that is the parent's share)."""
    c0, t0 = _cpu(), time.perf_counter()
    result = ingest(path, geometry, "sglang", out, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if result.stored != samples:
        raise RuntimeError(f"bench ingest stored {result.stored} of {samples} samples")
    return wall, cpu


def _floor(payloads: list[bytes]) -> float:
    """Decode every payload and keep the results (what any consumer holds until it is done)."""
    t0 = time.perf_counter()
    decoded = [pybase64.b64decode(p, validate=True) for p in payloads]
    elapsed = time.perf_counter() - t0
    del decoded
    return elapsed


def _floor_discard(payloads: list[bytes]) -> float:
    """Decode every payload and drop each result at once: the allocator hands the same warm
    pages back every time, so no page is ever faulted in. A lower bound no pipeline reaches."""
    t0 = time.perf_counter()
    for p in payloads:
        pybase64.b64decode(p, validate=True)
    return time.perf_counter() - t0


def _peer_chain(path: Path, out: Path, geometry: RoutingGeometry) -> float:
    """Today's usual chain: orjson -> str -> b64decode -> torch.frombuffer(bytearray) ->
    sort-based duplicate check + range check -> torch.save of int32, one file per sample."""
    import orjson
    import torch

    out.mkdir(parents=True, exist_ok=True)
    layers, k, e = geometry.num_layers, geometry.top_k, geometry.num_experts
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            obj = orjson.loads(line)
            text = obj["response"]["meta_info"]["routed_experts"]
            raw = pybase64.b64decode(text)
            t = torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(-1, layers, k)
            s = t.sort(dim=-1).values
            bad = bool((s[..., 1:] == s[..., :-1]).any()) or int(t.min()) < 0 or int(t.max()) >= e
            if not bad:
                torch.save(t, out / f"{obj['sample_id']}.pt")
    return time.perf_counter() - t0


def run(tokens: int = 400_000, model: str = "qwen3-30b-a3b", prompt_len: int = 512,
        completion_len: int = 1536, repeats: int = 3, peer: bool = True, busy: bool = True,
        workers: int = 2, workdir: Path | None = None) -> dict[str, Any]:
    """Ingest vs the floor (and the peer chain), quiet and, with ``busy``, while another
    process keeps one core busy; with ``workers > 1`` also ``ingest(workers=workers)``. Every
    figure a median of ``repeats`` interleaved rounds."""
    geometry = RoutingGeometry.resolve(model)
    seq = prompt_len + completion_len
    samples = -(-tokens // seq)
    root = Path(tempfile.mkdtemp(prefix="rb-bench-ingest-", dir=workdir))
    try:
        path = root / "responses.jsonl"
        payloads = write_sglang_jsonl(path, geometry, samples, prompt_len, completion_len)
        rows = samples * (seq - 1)
        floor_s, discard_s, ingest_s, cpu_s, peer_s = [], [], [], [], []
        busy_floor_s, busy_ingest_s, busy_cpu_s = [], [], []
        pool_s, busy_pool_s = [], []
        shard_bytes = stored_tokens = 0
        pool_start_s = 0.0
        if workers > 1:  # the fork server starts once per process: timed apart
            t0 = time.perf_counter()
            _timed_ingest(path, root / "warm", geometry, samples, workers)
            pool_start_s = time.perf_counter() - t0
            shutil.rmtree(root / "warm")
        for r in range(repeats):
            floor_s.append(_floor(payloads))
            discard_s.append(_floor_discard(payloads))
            out = root / f"shards-{r}"
            wall, cpu = _timed_ingest(path, out, geometry, samples)
            ingest_s.append(wall)
            cpu_s.append(cpu)
            manifest = Manifest.read(out)
            shard_bytes, stored_tokens = manifest.bytes, manifest.tokens
            shutil.rmtree(out)
            if workers > 1:
                pool_s.append(_timed_ingest(path, out, geometry, samples, workers)[0])
                shutil.rmtree(out)
            if busy:
                with _one_core_busy():
                    busy_floor_s.append(_floor(payloads))
                    wall, cpu = _timed_ingest(path, out, geometry, samples)
                    shutil.rmtree(out)
                    if workers > 1:
                        busy_pool_s.append(
                            _timed_ingest(path, out, geometry, samples, workers)[0])
                        shutil.rmtree(out)
                busy_ingest_s.append(wall)
                busy_cpu_s.append(cpu)
            if peer:
                peer_s.append(_peer_chain(path, root / f"peer-{r}", geometry))
                shutil.rmtree(root / f"peer-{r}")
        floor, ours = statistics.median(floor_s), statistics.median(ingest_s)
        int32_per_token = geometry.wire_ids_per_token * 4
        out: dict[str, Any] = {
            "benchmark": "ingest",
            "geometry": geometry.describe(),
            "samples": samples,
            "tokens": samples * seq,
            "routing_rows": rows,
            "jsonl_bytes": path.stat().st_size,
            "base64_bytes": sum(len(p) for p in payloads),
            "repeats": repeats,
            "floor_b64decode_s": round(floor, 4),
            "floor_b64decode_discard_s": round(statistics.median(discard_s), 4),
            "ingest_s": round(ours, 4),
            "ingest_over_floor": round(ours / floor, 3),
            "ingest_tokens_per_s": round(samples * seq / ours),
            "shard_bytes_per_token": round(shard_bytes / stored_tokens, 2),
            "int32_bytes_per_token": int32_per_token,
            "shard_over_int32": round(shard_bytes / stored_tokens / int32_per_token, 4),
            "ingest_over_discard_floor": round(ours / statistics.median(discard_s), 3),
            "ingest_cpu_s": round(statistics.median(cpu_s), 4),
            "ingest_cpu_over_floor": round(statistics.median(cpu_s) / floor, 3),
            "compiled_checks": scan_is_compiled(),
            "runs_s": {"floor": floor_s, "floor_discard": discard_s, "ingest": ingest_s,
                       "ingest_cpu": cpu_s},
        }
        if busy:
            bf, bi = statistics.median(busy_floor_s), statistics.median(busy_ingest_s)
            out["one_core_busy"] = {
                "floor_b64decode_s": round(bf, 4),
                "ingest_s": round(bi, 4),
                "ingest_over_floor": round(bi / bf, 3),
                "ingest_cpu_s": round(statistics.median(busy_cpu_s), 4),
                "runs_s": {"floor": busy_floor_s, "ingest": busy_ingest_s,
                           "ingest_cpu": busy_cpu_s},
            }
        if workers > 1:
            w = statistics.median(pool_s)
            out["workers"] = {
                "workers": workers,
                "ingest_s": round(w, 4),
                "ingest_over_floor": round(w / floor, 3),
                "first_call_s": round(pool_start_s, 4),
                "first_call_note": "the first ingest with workers in a process, which starts "
                                   "the fork server (not in the medians)",
                "runs_s": {"ingest": pool_s},
            }
            if busy:
                bw = statistics.median(busy_pool_s)
                out["workers"]["one_core_busy"] = {
                    "ingest_s": round(bw, 4),
                    "ingest_over_floor": round(bw / statistics.median(busy_floor_s), 3),
                    "runs_s": {"ingest": busy_pool_s},
                }
        if peer:
            p = statistics.median(peer_s)
            out["peer_chain_s"] = round(p, 4)
            out["peer_over_ingest"] = round(p / ours, 3)
            out["runs_s"]["peer"] = peer_s
        pool = out.get("workers", {})
        best = min(out["ingest_over_floor"], pool.get("ingest_over_floor", math.inf))
        best_busy = min(out["one_core_busy"]["ingest_over_floor"],
                        pool.get("one_core_busy", {}).get("ingest_over_floor", math.inf)
                        ) if busy else None
        out["targets_note"] = "ingest targets: the better of one process and --workers"
        out["targets"] = {
            "ingest_over_floor<=1.0": best <= 1.0,
            "one_core_busy_ingest_over_floor<=1.3": (best_busy <= 1.3) if busy else None,
            "peer_over_ingest>=2": (out.get("peer_over_ingest", 0) >= 2.0) if peer else None,
            "shard_over_int32<=0.25": out["shard_over_int32"] <= 0.25,
        }
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
