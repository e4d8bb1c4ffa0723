"""``bench cluster``: distributed collect throughput with 1, 2, 4, ... Ray collector workers
against light responders (one per worker), all writing into one dataset.

One local Ray cluster serves every round; rounds for the worker counts are interleaved, and
the figure is the median of the rounds' wall times (first worker start to last worker end).
On a machine with C cores the curve stops rising once collectors plus responders ask for more
than C cores: the JSON reports the machine's CPU count so the curve can be read against it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from .responder import start_responder, stop_responder

__all__ = ["run"]


def _cpu_ticks() -> tuple[int, int] | None:
    """``(all, idle)`` jiffies of the whole machine (Linux), to tell how busy it was."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(v), v[3] + v[4]


def _busy_cores(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float | None:
    if a is None or b is None or b[0] == a[0]:
        return None
    total, idle = b[0] - a[0], b[1] - a[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def run(*, workers: tuple[int, ...] = (1, 2, 4), prompts: int = 256, prompt_len: int = 256,
        max_new_tokens: int = 256, model: str = "qwen3-30b-a3b", engine: str = "sglang",
        concurrency: int = 16, repeats: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    """Collect ``prompts`` prompts with each worker count (``repeats`` interleaved rounds) and
    report samples/s and tokens/s, and the speed-up over one worker."""
    try:
        import ray

        from ..client import Prompt, SamplingParams
        from ..ray import collect_on_ray
    except ImportError as e:
        raise RuntimeError(f"bench cluster needs the ray and client extras "
                           f"(pip install 'routing-replay-bridge[ray,client]'): {e}") from None
    geometry = RoutingGeometry.resolve(model)
    rng = np.random.default_rng(0)
    prompt_list = [Prompt(f"c{i:06d}", rng.integers(0, 50_000, prompt_len).tolist())
                   for i in range(prompts)]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    responders = [start_responder("bench cluster", engine, model) for _ in range(max(workers))]
    urls = [url for _, url in responders]
    tokens = prompts * (prompt_len + max_new_tokens)
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    seconds: dict[int, list[float]] = {n: [] for n in workers}
    busy: dict[int, list[float]] = {n: [] for n in workers}
    owned = not ray.is_initialized()
    try:
        if owned:
            ray.init(num_cpus=max(max(workers), os.cpu_count() or 1), log_to_driver=False,
                     include_dashboard=False)
        for r in range(repeats):
            for n in workers:
                out = Path(tmp.name) / f"w{n}-r{r}-{uuid.uuid4().hex[:6]}"
                before = _cpu_ticks()
                summary = collect_on_ray(endpoints=urls[:n], engine=engine, prompts=prompt_list,
                                         geometry=geometry, out=str(out), workers=n,
                                         params=params, concurrency=concurrency,
                                         total_prompts=prompts)
                stored = summary["totals"]["stored"]
                if stored != prompts:
                    raise RuntimeError(f"{n} workers stored {stored} of {prompts} samples "
                                       f"(unfinished: {summary['unfinished'][:5]})")
                seconds[n].append(float(summary["seconds"]))
                cores = _busy_cores(before, _cpu_ticks())
                if cores is not None:
                    busy[n].append(cores)
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()
        for proc, _ in responders:
            stop_responder(proc)
        tmp.cleanup()
    base = statistics.median(seconds[workers[0]])
    results = []
    for n in workers:
        med = statistics.median(seconds[n])
        results.append({"workers": n, "seconds": round(med, 3),
                        "samples_per_s": round(prompts / med, 1),
                        "tokens_per_s": round(tokens / med),
                        "speedup_over_first": round(base / med, 2),
                        "machine_busy_cores": round(statistics.median(busy[n]), 2)
                        if busy[n] else None,
                        "rounds_s": [round(s, 3) for s in seconds[n]]})
    return {
        "benchmark": "cluster",
        "geometry": geometry.to_dict(),
        "machine": {"cpus": os.cpu_count()},
        "settings": {"prompts": prompts, "prompt_len": prompt_len,
                     "max_new_tokens": max_new_tokens, "engine": engine,
                     "concurrency_per_worker": concurrency, "repeats": repeats,
                     "responders": "one light responder process per worker (workers use the "
                                   "first n)",
                     "timing": "median of interleaved rounds; wall time first worker start to "
                               "last worker end; one local Ray cluster",
                     "machine_busy_cores": "cores busy (all processes, /proc/stat) over each "
                                           "collect call, workers' start included"},
        "results": results,
    }
