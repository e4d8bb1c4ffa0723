"""Distributed collect: the driver that spreads prompts over N collector actors.

The driver reads the prompts, cuts them into chunks and keeps each worker fed (``inflight``
chunks queued per worker). Every worker writes into the same dataset through its own
:class:`~replay_bridge.shards.ShardWriter` (``resume=True``: a writer id and a manifest of its
own). A worker acknowledges a chunk once its samples are published. When a worker dies, the
chunks it had not acknowledged are collected again in a further *pass* by the workers still
alive, each with a fresh writer, which sees everything the dead worker published: those samples
are skipped, the rest are collected. Nothing published is lost and nothing is stored twice.
When no worker is left, the prompts not collected are reported (``unfinished``), never dropped
silently.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ..checks import CheckTally
from ..client import Prompt, RetryPolicy, SamplingParams, redact
from ..geometry import RoutingGeometry
from ..shards import display_uri
from ._collector import COUNTERS, Collector

__all__ = ["NAMESPACE", "ProgressFn", "assign_endpoints", "collect_on_ray", "collect_with_tally",
           "merge_tallies"]

NAMESPACE = "replay_bridge"
"""The Ray namespace of the collector actors (named ``replay-bridge-collect-<run>-w<i>``)."""

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``on_progress(done_samples, total_samples, totals_so_far)``, called on the driver."""


def assign_endpoints(endpoints: Sequence[str], workers: int) -> list[list[str]]:
    """Round-robin shares: worker ``i`` gets ``endpoints[i::workers]`` when there are at least
    as many endpoints as workers, else ``[endpoints[i % len(endpoints)]]``."""
    if not endpoints:
        raise ValueError("at least one endpoint is needed")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if len(endpoints) >= workers:
        return [list(endpoints[i::workers]) for i in range(workers)]
    return [[endpoints[i % len(endpoints)]] for i in range(workers)]


def merge_tallies(geometry: RoutingGeometry, tallies: Iterable[CheckTally | None]) -> CheckTally:
    """The sum of check tallies (each worker's table into one)."""
    out = CheckTally(geometry)
    for t in tallies:
        if t is not None:
            out.add_tally(t)
    return out


@dataclass
class _Worker:
    index: int
    actor: Any
    alive: bool = True
    status: str = "running"
    error: str | None = None
    host: str = ""
    writer_ids: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    chunks: dict[int, list[Prompt]] = field(default_factory=dict)  # given, not acknowledged
    feeds: int = 0  # feed calls in flight
    finishing: bool = False
    done: bool = False  # finished this pass
    # per pass: the latest report (cumulative within the pass); earlier passes summed in
    report: dict[str, Any] | None = None
    past: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    acked_chunks: int = 0
    writer_stats: list[dict[str, int]] = field(default_factory=list)

    def reports(self) -> list[dict[str, Any]]:
        return self.past + ([self.report] if self.report is not None else [])

    def counts(self) -> dict[str, int]:
        total = dict.fromkeys((*COUNTERS, "prompts_skipped", "samples_skipped"), 0)
        for r in self.reports():
            for k, v in r["counts"].items():
                total[k] = total.get(k, 0) + int(v)
        return total


def _chunks(prompts: Iterable[Prompt], size: int) -> Iterator[list[Prompt]]:
    seen: set[str] = set()
    it = iter(prompts)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        for p in chunk:
            if p.prompt_id in seen:
                raise ValueError(f"prompt_id {p.prompt_id!r} repeats an earlier prompt")
            seen.add(p.prompt_id)
        yield chunk


def collect_on_ray(**options: Any) -> dict[str, Any]:
    """Collect prompts into one dataset with N collector actors on a Ray cluster; the
    summary dict of :func:`collect_with_tally` (see there for every option)."""
    return collect_with_tally(**options)[0]


def collect_with_tally(
    *,
    endpoints: Sequence[str],
    engine: str,
    prompts: Iterable[Prompt],
    geometry: RoutingGeometry,
    out: str | Path,
    workers: int = 2,
    address: str | None = None,
    samples_per_prompt: int = 1,
    params: SamplingParams | None = None,
    served_model: str | None = None,
    concurrency: int = 64,
    timeout: float = 600.0,
    retry: RetryPolicy | None = None,
    max_response_bytes: int = 1 << 30,
    api_key_env: str | None = "REPLAY_BRIDGE_API_KEY",
    samples_per_shard: int = 1024,
    compression: str | None = None,
    keep_verdicts: bool = False,
    total_prompts: int | None = None,
    chunk_prompts: int | None = None,
    inflight: int = 2,
    num_cpus: float = 1.0,
    on_progress: ProgressFn | None = None,
    on_start: Callable[[list[Any]], None] | None = None,
) -> tuple[dict[str, Any], CheckTally]:
    """Collect ``prompts`` into the dataset ``out`` with ``workers`` collector actors on a Ray
    cluster and return one summary (the shape of ``collect --json``, plus ``workers``: one
    entry per worker, ``passes``, ``unfinished`` and ``seconds``, the wall time from the first
    worker's start to the last one's end), and the merged check tally (for the table).

    ``address``: passed to ``ray.init`` when Ray is not initialised in this process (``None``:
    ``RAY_ADDRESS`` or a new local cluster). ``concurrency`` is per worker. ``out`` must be a
    dataset every worker can reach (a shared path or an object store URI); the caller checks
    that it is empty unless it means to add to it (every worker opens it with ``resume=True``,
    so ids stored there already are skipped). ``on_start(actor_handles)`` runs once the
    workers are started (tests use it to kill one).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    assign_endpoints(endpoints, workers)  # refuses no endpoints, no workers
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address or None, namespace=NAMESPACE, log_to_driver=False)
    try:
        return _collect(endpoints=endpoints, engine=engine, prompts=prompts, geometry=geometry,
                        out=out, workers=workers, samples_per_prompt=samples_per_prompt,
                        params=params, served_model=served_model, concurrency=concurrency,
                        timeout=timeout, retry=retry, max_response_bytes=max_response_bytes,
                        api_key_env=api_key_env, samples_per_shard=samples_per_shard,
                        compression=compression, keep_verdicts=keep_verdicts,
                        total_prompts=total_prompts, chunk_prompts=chunk_prompts,
                        inflight=inflight, num_cpus=num_cpus, on_progress=on_progress,
                        on_start=on_start)
    finally:
        if owned:
            ray.shutdown()


def _collect(*, endpoints: Sequence[str], engine: str, prompts: Iterable[Prompt],
             geometry: RoutingGeometry, out: str | Path, workers: int, samples_per_prompt: int,
             params: SamplingParams | None, served_model: str | None, concurrency: int,
             timeout: float, retry: RetryPolicy | None, max_response_bytes: int,
             api_key_env: str | None, samples_per_shard: int, compression: str | None,
             keep_verdicts: bool, total_prompts: int | None, chunk_prompts: int | None,
             inflight: int, num_cpus: float, on_progress: ProgressFn | None,
             on_start: Callable[[list[Any]], None] | None
             ) -> tuple[dict[str, Any], CheckTally]:
    t_setup = time.perf_counter()
    g = samples_per_prompt
    if chunk_prompts is None:
        chunk_prompts = max(1, samples_per_shard // g)
        if total_prompts:
            chunk_prompts = min(chunk_prompts, max(1, math.ceil(total_prompts / (workers * 4))))
    total = (total_prompts or 0) * g
    client_options: dict[str, Any] = {
        "engine": engine, "model": served_model, "params": params, "concurrency": concurrency,
        "timeout": timeout, "retry": retry, "max_response_bytes": max_response_bytes,
        "api_key_env": api_key_env}
    writer_options: dict[str, Any] = {"samples_per_shard": samples_per_shard}
    if compression is not None:
        writer_options["compression"] = compression
    run = uuid.uuid4().hex[:8]
    actor_cls = ray.remote(Collector)
    queue_prompts = max(chunk_prompts, math.ceil(concurrency / g))
    pool = [_Worker(i, actor_cls.options(
        name=f"replay-bridge-collect-{run}-w{i}", namespace=NAMESPACE, num_cpus=num_cpus,
        max_concurrency=inflight + 3, max_restarts=0, scheduling_strategy="SPREAD",
    ).remote(i, str(out), geometry.to_dict(), client_options, writer_options, g, keep_verdicts,
             queue_prompts)) for i in range(workers)]

    try:
        return _drive(pool, _chunks(prompts, chunk_prompts), endpoints, g, inflight, total,
                      t_setup, geometry, out, engine, keep_verdicts, on_progress, on_start)
    finally:
        for w in pool:
            ray.kill(w.actor)


def _drive(pool: list[_Worker], source: Iterator[list[Prompt]], endpoints: Sequence[str],
           g: int, inflight: int, total: int, t_setup: float, geometry: RoutingGeometry,
           out: str | Path, engine: str, keep_verdicts: bool, on_progress: ProgressFn | None,
           on_start: Callable[[list[Any]], None] | None
           ) -> tuple[dict[str, Any], CheckTally]:
    """Feed the workers pass by pass until every chunk is acknowledged or no worker is
    left."""
    ids = itertools.count()
    done_samples = 0
    passes = 0
    t0 = time.perf_counter()
    retry_chunks: list[list[Prompt]] = []
    started = False

    def die(w: _Worker, e: BaseException) -> None:
        if not w.alive:
            return
        w.alive = False
        w.status = "died"
        w.error = redact(_reason(e))
        retry_chunks.extend(w.chunks.values())
        w.chunks.clear()

    def totals_so_far() -> dict[str, int]:
        out_t = dict.fromkeys((*COUNTERS, "prompts_skipped", "samples_skipped"), 0)
        for w in pool:
            for k, v in w.counts().items():
                out_t[k] += v
        return out_t

    def take(w: _Worker, r: dict[str, Any]) -> None:
        nonlocal done_samples
        for c in r["acked"]:
            chunk = w.chunks.pop(c, None)
            if chunk is not None:
                done_samples += len(chunk) * g
                w.acked_chunks += 1
        w.verdicts.extend(r["verdicts"])
        w.report = {"counts": r["counts"], "tally": r["tally"],
                    "first_rejected": r["first_rejected"]}
        if on_progress is not None:
            on_progress(done_samples, total, totals_so_far())

    while True:
        live = [w for w in pool if w.alive]
        if not live:
            break
        chunks: Iterator[list[Prompt]] = source if passes == 0 else iter(retry_chunks)
        if passes:
            retry_chunks = []
        passes += 1
        for w, share in zip(live, assign_endpoints(endpoints, len(live))):
            w.endpoints, w.done, w.finishing, w.feeds = share, False, False, 0
            if w.report is not None:
                w.past.append(w.report)
                w.report = None
        starts = {w.actor.start.remote(w.endpoints): w for w in live}
        for ref, w in starts.items():
            try:
                info = ray.get(ref)
                w.host = info["host"]
                w.writer_ids.append(info["writer_id"])
            except Exception as e:  # noqa: BLE001 - a worker that cannot start is dead
                die(w, e)
        if not started:
            started = True
            t0 = time.perf_counter()
            if on_start is not None:
                on_start([w.actor for w in pool])
        calls: dict[Any, tuple[_Worker, str]] = {}
        exhausted = False
        while True:
            for w in pool:
                if not w.alive or w.done or w.finishing:
                    continue
                while w.feeds < inflight and not exhausted:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    c = next(ids)
                    w.chunks[c] = chunk
                    w.feeds += 1
                    calls[w.actor.feed.remote(c, chunk)] = (w, "feed")
                if exhausted and w.feeds == 0:
                    w.finishing = True
                    calls[w.actor.finish.remote()] = (w, "finish")
            if not calls:
                break
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=1.0)
            if not ready:
                polled = {w.index for w, kind in calls.values() if kind == "poll"}
                for w in pool:
                    if w.alive and w.finishing and not w.done and w.index not in polled:
                        calls[w.actor.poll.remote()] = (w, "poll")
                continue
            for ref in ready:
                w, kind = calls.pop(ref)
                if kind == "feed":
                    w.feeds -= 1
                try:
                    r = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the actor died or its run failed
                    die(w, e)
                    continue
                if not w.alive:
                    continue
                take(w, r)
                if kind == "finish":
                    w.done = True
                    w.writer_stats.append(r["writer"])
            # a dead worker's calls are answered with errors; drop them
            for ref in [r for r, (w, _) in calls.items() if not w.alive]:
                calls.pop(ref)
        if not retry_chunks:
            break
    seconds = time.perf_counter() - t0
    for w in pool:
        if w.alive:
            w.status = "finished"
    unfinished = [p.prompt_id for c in retry_chunks for p in c]
    summary, tally = _summary(pool, geometry, out, engine, endpoints, g, seconds, passes,
                              unfinished, keep_verdicts, done_samples)
    summary["setup_seconds"] = round(t0 - t_setup, 3)
    return summary, tally


def _reason(e: BaseException) -> str:
    """One line for a dead worker: the cause Ray gives, without its traceback."""
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("RuntimeError: collector"):
            return line.removeprefix("RuntimeError: ")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"[:500]


def _summary(pool: list[_Worker], geometry: RoutingGeometry, out: str | Path, engine: str,
             endpoints: Sequence[str], g: int, seconds: float, passes: int,
             unfinished: list[str], keep_verdicts: bool, done_samples: int
             ) -> tuple[dict[str, Any], CheckTally]:
    counts = dict.fromkeys((*COUNTERS, "prompts_skipped", "samples_skipped"), 0)
    first_rejected: list[dict[str, Any]] = []
    workers = []
    for w in pool:
        c = w.counts()
        for k, v in c.items():
            counts[k] += v
        for r in w.reports():
            first_rejected.extend(r["first_rejected"])
        workers.append({
            "worker": w.index, "status": w.status, "error": w.error, "host": w.host,
            "endpoints": [redact(e) for e in w.endpoints], "writer_ids": w.writer_ids,
            "chunks": w.acked_chunks, "stored": c["stored"], "rejected": c["rejected"],
            "failed": c["failed"], "samples": c["samples"], "tokens": c["tokens"],
            "prompts_skipped": c["prompts_skipped"], "retries": c["retries"]})
    tally = merge_tallies(geometry, (r["tally"] for w in pool for r in w.reports()))
    prompts = done_samples // g  # acknowledged (collected or already stored)
    totals = {
        "prompts": prompts + len(unfinished),
        "prompts_skipped": counts["prompts_skipped"],
        "samples": counts["samples"],
        "stored": counts["stored"],
        "rejected": counts["rejected"],
        "failed": counts["failed"],
        "tokens": counts["tokens"],
        "tokens_stored": counts["tokens_stored"],
        "by_kind": dict(tally.by_kind),
        "retries": counts["retries"],
        "seconds": round(seconds, 3),
        "samples_per_s": round(counts["samples"] / seconds, 2) if seconds else None,
        "tokens_per_s": round(counts["tokens"] / seconds, 1) if seconds else None,
        "samples_already_stored": counts["samples_skipped"],
        "unfinished_prompts": len(unfinished),
    }
    summary: dict[str, Any] = {
        "out": display_uri(str(out)),
        "geometry": geometry.to_dict(),
        "engine": engine,
        "endpoints": [redact(e) for e in endpoints],
        "samples_per_prompt": g,
        "seconds": round(seconds, 3),
        "totals": totals,
        "check": tally.to_dict(),
        "workers": workers,
        "passes": passes,
        "unfinished": unfinished,
        "first_rejected": first_rejected[:20],
    }
    if keep_verdicts:
        summary["samples"] = [v for w in pool for v in w.verdicts]
    return summary, tally

