"""``bench memory``: peak resident memory of ``ingest`` and ``collect`` when every sample is
rejected, at N and at 8N samples.

Memory must follow the samples in flight, never the number rejected: a whole-run fault (an
unmerged PD router, an engine without routing capture) rejects every sample, and each rejected
sample's quarantine record carries its whole routing. Every sample here carries all-zero
routing (a capture that never happened), so every one is rejected as ``all_zero``.

Each measurement runs in a child process of its own (``python -m
replay_bridge.benchmarks.memory CHILD ...``) and reports its peak RSS (``VmHWM``, which starts
afresh at exec): ``ingest`` of a JSONL dump of SGLang ``/generate`` traffic, and ``collect``
from the light responder (``python -m reference_engine.loopback --zero-routing``, started as a
process, never imported). A child that only imports the modules gives the baseline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..geometry import RoutingGeometry
from ..protocols import Completion, SamplingParams, get_protocol
from .responder import start_responder, stop_responder

__all__ = ["TARGET_RATIO", "run", "write_rejected_jsonl"]

TARGET_RATIO = 1.2
PROMPT_LEN = 16
_MIB = 1 << 20


def write_rejected_jsonl(path: Path, geometry: RoutingGeometry, samples: int, rows: int) -> int:
    """Write ``samples`` lines of SGLang traffic whose routing (``rows`` positions each) is all
    zero; return the file's size in bytes."""
    protocol = get_protocol("sglang")
    completion = max(rows + 1 - PROMPT_LEN, 1)
    params = SamplingParams(max_new_tokens=completion)
    zeros = np.zeros((PROMPT_LEN + completion - 1, geometry.num_layers, geometry.top_k), np.int32)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for i in range(samples):
            sid = f"m{i:06d}"
            prompt = rng.integers(1, 50_000, PROMPT_LEN)
            output = rng.integers(1, 50_000, completion)
            (call,) = protocol.plan(prompt, [sid], params)
            response = protocol.encode_response(call.payload, [Completion(output, zeros)])
            f.write(orjson.dumps({"sample_id": sid, "request": call.payload,
                                  "response": response}) + b"\n")
    return path.stat().st_size


# ---- children -----------------------------------------------------------------------------


def _peak_rss() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child_idle(args: argparse.Namespace) -> dict[str, Any]:
    """Import what the ``args.part`` child imports, and nothing more."""
    if args.part == "collect":
        from .. import client, shards  # noqa: F401
    else:
        from .. import ingest  # noqa: F401
    return {}


def _child_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from ..ingest import ingest

    geometry = RoutingGeometry.resolve(args.model)
    result = ingest(args.path, geometry, "sglang", args.out)
    return {"samples": len(result.samples), "stored": result.stored,
            "rejected": result.rejected}


def _prompts(n: int) -> Iterator[Any]:
    from ..client import Prompt

    rng = np.random.default_rng(1)
    for i in range(n):
        yield Prompt(f"m{i:06d}", rng.integers(1, 50_000, PROMPT_LEN).tolist())


def _child_collect(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from ..client import RolloutClient, collect
    from ..shards import ShardWriter

    geometry = RoutingGeometry.resolve(args.model)
    params = SamplingParams(max_new_tokens=max(args.rows + 1 - PROMPT_LEN, 1))

    async def go() -> Any:
        async with RolloutClient(args.url, "sglang", geometry, params=params,
                                 concurrency=args.concurrency) as client:
            return await collect(client, _prompts(args.samples), writer)

    with ShardWriter(args.out, geometry) as writer:
        summary = asyncio.run(go())
    return {"samples": summary.samples, "stored": summary.stored,
            "rejected": summary.rejected, "failed": summary.failed}


_CHILDREN = {"idle": _child_idle, "ingest": _child_ingest, "collect": _child_collect}


def _child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m replay_bridge.benchmarks.memory")
    ap.add_argument("child", choices=sorted(_CHILDREN))
    ap.add_argument("--part", default="ingest")
    ap.add_argument("--model", default="tiny-qwen3-moe")
    ap.add_argument("--path")
    ap.add_argument("--out")
    ap.add_argument("--url")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args(argv)
    doc = _CHILDREN[args.child](args)
    doc["peak_rss_bytes"] = _peak_rss()
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


# ---- parent -------------------------------------------------------------------------------


def _measure(*args: str) -> dict[str, Any]:
    """Run one child; its JSON line."""
    done = subprocess.run([sys.executable, "-m", __name__, *args], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench memory child {args[0]} exited {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return orjson.loads(done.stdout.strip().splitlines()[-1])


def _pair(small: dict[str, Any], large: dict[str, Any], factor: int,
          baseline: int) -> dict[str, Any]:
    """Both runs, and the ratio of their peaks (also above the baseline)."""
    a, b = small["peak_rss_bytes"], large["peak_rss_bytes"]
    for d in (small, large):
        d["peak_rss_mib"] = round(d["peak_rss_bytes"] / _MIB, 1)
        d["above_baseline_mib"] = round((d["peak_rss_bytes"] - baseline) / _MIB, 1)
    return {"baseline_rss_mib": round(baseline / _MIB, 1), "n": small, f"{factor}n": large,
            "ratio": round(b / a, 3),
            "ratio_above_baseline": round((b - baseline) / max(a - baseline, 1), 3)}


def run(*, samples: int = 32, factor: int = 8, rows: int = 20_000,
        model: str = "tiny-qwen3-moe", concurrency: int = 4, workdir: Path | None = None,
        parts: tuple[str, ...] = ("ingest", "collect")) -> dict[str, Any]:
    """Peak RSS of ``ingest`` and ``collect`` over ``samples`` and ``factor * samples``
    rejected samples of ``rows`` routing rows each, each in a child process; the ratios of the
    large run's peak to the small one's.

    ``collect`` holds up to ``concurrency`` answers in flight and as many queued for the store
    thread: that memory follows the samples in flight, and a fair comparison needs the small
    run to fill the pipeline many times over (``samples`` >= 8 x ``concurrency``)."""
    geometry = RoutingGeometry.resolve(model)
    sizes = (samples, samples * factor)
    root = Path(tempfile.mkdtemp(prefix="rb-bench-memory-", dir=workdir))
    out: dict[str, Any] = {
        "bench": "memory",
        "model": model,
        "geometry": geometry.to_dict(),
        "rows_per_sample": rows,
        "samples": list(sizes),
        "factor": factor,
    }
    try:
        if "ingest" in parts:
            baseline = _measure("idle", "--part", "ingest")["peak_rss_bytes"]
            runs = []
            for n in sizes:
                path = root / f"rejected-{n}.jsonl"
                size = write_rejected_jsonl(path, geometry, n, rows)
                got = _measure("ingest", "--model", model, "--path", str(path),
                               "--out", str(root / f"ingest-{n}"))
                got["jsonl_mib"] = round(size / _MIB, 1)
                runs.append(got)
                path.unlink()
                shutil.rmtree(root / f"ingest-{n}", ignore_errors=True)
            out["ingest"] = _pair(*runs, factor, baseline)
        if "collect" in parts:
            baseline = _measure("idle", "--part", "collect")["peak_rss_bytes"]
            proc, url = start_responder("bench memory", "sglang", model, "--zero-routing")
            try:
                runs = [_measure("collect", "--model", model, "--url", url,
                                 "--out", str(root / f"collect-{n}"), "--samples", str(n),
                                 "--rows", str(rows), "--concurrency", str(concurrency))
                        for n in sizes]
            finally:
                stop_responder(proc)
            out["collect"] = _pair(*runs, factor, baseline)
            out["concurrency"] = concurrency
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["target"] = f"peak RSS at {factor}N / at N <= {TARGET_RATIO}"
    out["targets"] = {f"{part}_ratio<={TARGET_RATIO}": out[part]["ratio"] <= TARGET_RATIO
                      for part in parts if part in out}
    out["note"] = ("peak RSS = VmHWM of a child process running only that measurement; every "
                   "sample carries all-zero routing and is rejected (all_zero) with its "
                   "routing quarantined. baseline = a child that only imports what the "
                   "measured one imports; above_baseline = peak - baseline. collect holds up "
                   "to 2 x concurrency answers (in flight and queued), so the small run should "
                   "have >= 8 x concurrency samples.")
    return out


if __name__ == "__main__":
    _child_main(sys.argv[1:])
