"""``bench layout``: one micro-batch's routing laid out for a trainer rank (``layout_routing``)
on one core, before and after its vectorised copy paths, side by side.

The micro-batch: ``tokens`` router tokens of several samples of realistic lengths (prompts of
a few hundred tokens, completions of several hundred), realistic routing
(:class:`~replay_bridge.benchmarks.routing_model.RoutingModel`), some samples with
``routed_start > 0`` and one with rows marked native (stored as 0, as ``accept`` stores them).
Cases: ``thd`` (packed, the whole micro-batch), ``bshd`` (``tokens / seq_length`` rows of
``seq_length``), and ``thd`` under context parallel 2 with sequence parallel 2 (rank 0's
quarter). Each contender runs ``calls`` times per round (mean per call); rounds interleave the
contenders in rotating order; figures are medians over rounds.

One core: the process is pinned to one CPU (``os.sched_setaffinity``) while it measures, and
the layout calls no BLAS, so NumPy runs everything on that core.

``before`` is the code this change replaced (``layout_routing`` as of commit 9221d6b, copied
below as :func:`layout_before`, kept only for this comparison).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..checks import has_repeated_ids, repeated_ids
from ..geometry import RoutingGeometry
from ..layout import (
    COMPLETION,
    NATIVE,
    PAD,
    PROMPT,
    HostRouting,
    LayoutError,
    Packing,
    RankSlice,
    layout_routing,
    pad_ids,
)
from ..sample import RoutedSample
from .routing_model import RoutingModel

__all__ = ["layout_before", "micro_batch", "run"]

TARGET_MS = 2.0
STAGES = ("index", "gather", "pad", "validate", "region")


def micro_batch(geometry: RoutingGeometry, tokens: int, *, samples: int = 6, seed: int = 0,
                ) -> list[RoutedSample]:
    """``samples`` samples of ``tokens`` tokens in all (each at least 8; lengths 0.5-1.5x the
    mean), prompts of 15-35 % of a sample; samples 1 and 3 start their routing at positions 2
    and 16; sample 2 marks ~1 row in 20 native (ids stored as 0, as ``accept`` stores them)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, samples)
    lengths = np.maximum((weights / weights.sum() * tokens).astype(np.int64), 8)
    lengths[-1] = max(tokens - int(lengths[:-1].sum()), 8)
    model = RoutingModel(geometry, seed=seed)
    out = []
    for i, n in enumerate(lengths.tolist()):
        start = {1: 2, 3: 16}.get(i, 0)
        start = min(start, n - 2)
        prompt = max(start + 1, int(n * rng.uniform(0.15, 0.35)))
        routed = model.routing(n - 1 - start)
        native = None
        if i == 2:
            native = rng.random(routed.shape[0]) < 0.05
            routed[native] = 0
        out.append(RoutedSample(sample_id=f"bench-{i}", tokens=np.zeros(n, np.int32),
                                prompt_len=prompt, routed_start=start, native=native,
                                routed=routed))
    return out


def _cases(geometry: RoutingGeometry, tokens: int, seed: int
           ) -> list[tuple[str, list[RoutedSample], Packing, RankSlice]]:
    """(name, samples, packing, rank slice) of each case. ``bshd``: rows of ``seq_length``
    (1024 when ``tokens`` is a multiple of it, else ``tokens / 4``), samples filling ~85 % of
    them on average (each cut to ``seq_length``)."""
    samples = micro_batch(geometry, tokens, seed=seed)
    seq_length = 1024 if tokens % 1024 == 0 and tokens >= 2048 else max(-(-tokens // 4), 8)
    rows = max(tokens // seq_length, 1)
    bshd = [_cut(s, seq_length) for s in
            micro_batch(geometry, int(tokens * 0.85), samples=rows, seed=seed + 1)]
    return [
        ("thd", samples, Packing.thd(), RankSlice()),
        ("bshd", bshd, Packing.bshd(seq_length), RankSlice()),
        ("thd_cp2_sp2_rank0", samples, Packing.thd(pad_multiple=8),
         RankSlice(tp_size=2, tp_rank=0, sequence_parallel=True, cp_size=2, cp_rank=0)),
    ]


def _cut(s: RoutedSample, seq_length: int) -> RoutedSample:
    """``s`` cut to at most ``seq_length`` tokens (its first routing rows kept)."""
    n = min(s.num_tokens, seq_length)
    keep = max(n - 1 - s.routed_start, 0)
    return RoutedSample(sample_id=s.sample_id, tokens=s.tokens[:n],
                        prompt_len=min(s.prompt_len, n), routed_start=s.routed_start,
                        native=None if s.native is None else s.native[:keep],
                        routed=s.routed[:keep])


def _same(a: HostRouting, b: HostRouting) -> bool:
    return (np.array_equal(a.ids, b.ids) and np.array_equal(a.region, b.region)
            and np.array_equal(a.cu_seqlens_padded, b.cu_seqlens_padded))


def _timed(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def _pin_one_core() -> tuple[set[int] | None, int | None]:
    """Pin this process to one of its CPUs; returns the old set (to restore) and the CPU."""
    if not hasattr(os, "sched_setaffinity"):
        return None, None
    old = os.sched_getaffinity(0)
    cpu = max(old)
    os.sched_setaffinity(0, {cpu})
    return old, cpu


def run(tokens: int = 4096, models: Sequence[str] = ("qwen3-30b-a3b", "deepseek-v3"),
        repeats: int = 5, calls: int = 20, seed: int = 0) -> dict[str, Any]:
    if repeats < 1 or calls < 1:
        raise ValueError("repeats and calls must be >= 1")
    old_affinity, cpu = _pin_one_core()
    try:
        results = []
        for model in models:
            geometry = RoutingGeometry.resolve(model)
            for name, batch, packing, rank in _cases(geometry, tokens, seed):
                results.append(_case(model, geometry, name, batch, packing, rank, repeats,
                                     calls))
    finally:
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
    headline = [r for r in results if r["model"] == models[0] and r["case"] != "thd_cp2_sp2_rank0"]
    worst = max(r["after_ms"] for r in headline) if headline else None
    return {
        "benchmark": "layout",
        "tokens": tokens,
        "repeats": repeats,
        "calls_per_round": calls,
        "threads": {"cpu_affinity": None if cpu is None else [cpu],
                    "how": "os.sched_setaffinity to one CPU while measuring; the layout "
                           "calls no BLAS, NumPy ufuncs and copies run on the calling thread"},
        "before": "layout_routing of commit 9221d6b, copied into "
                  "replay_bridge.benchmarks.layout.layout_before",
        "results": results,
        "target_ms": TARGET_MS,
        "target": {"model": models[0] if models else None,
                   "cases": [r["case"] for r in headline], "worst_after_ms": worst,
                   "met": worst is not None and worst < TARGET_MS},
    }


def _case(model: str, geometry: RoutingGeometry, name: str, batch: list[RoutedSample],
          packing: Packing, rank: RankSlice, repeats: int, calls: int) -> dict[str, Any]:
    after = layout_routing(batch, geometry, packing, rank)
    before = layout_before(batch, geometry, packing, rank)
    if not _same(after, before):
        raise RuntimeError(f"bench layout: {model} {name}: the layout differs from before's")
    contenders = {
        "before": lambda: layout_before(batch, geometry, packing, rank),
        "after": lambda: layout_routing(batch, geometry, packing, rank),
        "before_no_validate": lambda: layout_before(batch, geometry, packing, rank,
                                                    validate=False),
        "after_no_validate": lambda: layout_routing(batch, geometry, packing, rank,
                                                    validate=False),
    }
    runs: dict[str, list[float]] = {k: [] for k in contenders}
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    names = list(contenders)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            runs[k].append(_timed(contenders[k], calls))
        per = {k: 0.0 for k in STAGES}
        for _ in range(calls):
            clock: list[tuple[str, float]] = [("start", time.perf_counter())]
            layout_routing(batch, geometry, packing, rank, clock=clock)
            for (_, t0), (stage, t1) in zip(clock, clock[1:]):
                per[stage] += (t1 - t0) * 1e3 / calls
        for k in STAGES:
            stages[k].append(per[k])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": model,
        "geometry": geometry.describe(),
        "case": name,
        "samples": len(batch),
        "router_tokens": after.num_tokens,
        "stored_rows_used": int((after.region < PAD).sum()),
        "native_tokens": int((after.region == NATIVE).sum()),
        "pad_tokens": int((after.region == PAD).sum()),
        "layers": len(after.layers),
        "top_k": geometry.top_k,
        "id_dtype": geometry.id_dtype.name,
        "before_ms": round(med["before"], 3),
        "after_ms": round(med["after"], 3),
        "speedup": round(med["before"] / med["after"], 2),
        "before_no_validate_ms": round(med["before_no_validate"], 3),
        "after_no_validate_ms": round(med["after_no_validate"], 3),
        "after_breakdown_ms": {k: round(statistics.median(v), 3) for k, v in stages.items()},
        "meets_target": med["after"] < TARGET_MS,
        "runs_ms": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }


# --------------------------------------------------------------------------------------------
# before: the code this change replaced, for the side-by-side comparison only


def _check_rows_before(samples: Sequence[RoutedSample], geometry: RoutingGeometry) -> None:
    m, k = geometry.num_moe_layers, geometry.top_k
    for s in samples:
        r = s.routed
        if r.ndim != 3 or r.shape[1:] != (m, k):
            raise LayoutError(
                f"sample {s.sample_id!r}: routing shape {tuple(r.shape)} does not match the "
                f"geometry [rows, {m} MoE layers, top_k={k}]"
            )
        if s.rows != s.expected_rows:
            raise LayoutError(
                f"sample {s.sample_id!r}: {s.num_tokens} tokens with routed_start="
                f"{s.routed_start} need {s.expected_rows} routing rows, the sample has {s.rows}"
            )
        if s.native is not None and np.shape(s.native) != (s.rows,):
            raise LayoutError(
                f"sample {s.sample_id!r}: native marks of shape {np.shape(s.native)} for "
                f"{s.rows} routing rows"
            )


def layout_before(
    samples: Sequence[RoutedSample],
    geometry: RoutingGeometry,
    packing: Packing,
    rank: RankSlice = RankSlice(),
    layers: Sequence[int] | None = None,
    seq_lengths: Sequence[int] | None = None,
    validate: bool = True,
) -> HostRouting:
    """Lay out one micro-batch's routing for this rank's routers.

    ``layers``: the wire layer indices of this rank's routers (all MoE layers by default).
    ``seq_lengths``: the trainer's own token count per sample, checked against the samples.
    ``validate``: refuse ids outside ``[0, num_experts)`` and blocks with a repeated id (the
    all-to-all dispatcher crashes on them, the all-gather one silently merges them). Stored ids
    of native rows are never read: those rows take pad ids.
    """
    if not samples:
        raise LayoutError("a micro-batch needs at least one sample")
    _check_rows_before(samples, geometry)
    layers = tuple(geometry.moe_layers if layers is None else layers)
    moe_pos = {l: i for i, l in enumerate(geometry.moe_layers)}
    bad = [l for l in layers if l not in moe_pos]
    if bad:
        raise LayoutError(f"layers {bad} are not MoE layers of {geometry.describe()}")
    slots = np.asarray([moe_pos[l] for l in layers], dtype=np.intp)

    n = np.asarray([s.num_tokens for s in samples], dtype=np.int64)
    if seq_lengths is not None:
        given = np.asarray(seq_lengths, dtype=np.int64)
        if given.shape != n.shape or (given != n).any():
            i = int(np.flatnonzero(given != n)[0]) if given.shape == n.shape else 0
            raise LayoutError(
                f"sample {samples[i].sample_id!r}: the trainer's sequence has "
                f"{int(given[i]) if given.shape == n.shape else given.shape} tokens, the stored "
                f"sample {int(n[i])}"
            )
    if packing.format == "bshd" and (n > packing.seq_length).any():
        i = int(np.argmax(n > packing.seq_length))
        raise LayoutError(
            f"sample {samples[i].sample_id!r} has {int(n[i])} tokens, more than the bshd "
            f"seq_length {packing.seq_length}"
        )
    padded = packing.pack_lengths(n)
    cp, tp = rank.cp_size, rank.tp_size
    if (padded % (2 * cp) != 0).any() and cp > 1:
        i = int(np.argmax(padded % (2 * cp) != 0))
        raise LayoutError(
            f"context parallel {cp} needs every padded sequence length divisible by {2 * cp}; "
            f"sample {samples[i].sample_id!r} is padded to {int(padded[i])}"
        )

    # Global (pre-CP) token axis: sequence i occupies [starts[i], starts[i] + padded[i]).
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    total = int(padded.sum())
    seq = np.repeat(np.arange(len(samples)), padded)
    pos = np.arange(total, dtype=np.int64) - starts[seq]

    if cp > 1:
        chunk = pos // (padded[seq] // (2 * cp))
        keep = (chunk == rank.cp_rank) | (chunk == 2 * cp - 1 - rank.cp_rank)
        gidx = np.flatnonzero(keep)
    else:
        gidx = np.arange(total, dtype=np.int64)

    if packing.format == "bshd":
        b = len(samples)
        gidx = gidx.reshape(b, -1).T.reshape(-1)  # sequence-major: row s * b + b_idx

    if rank.sequence_parallel and tp > 1:
        if gidx.size % tp:
            raise LayoutError(
                f"sequence parallel {tp} needs the local token count divisible by {tp}, "
                f"got {gidx.size}"
            )
        per = gidx.size // tp
        gidx = gidx[rank.tp_rank * per : (rank.tp_rank + 1) * per]

    # Map each router token to a stored row, or to a pad row.
    s_of, p_of = seq[gidx], pos[gidx]
    rstart = np.asarray([s.routed_start for s in samples], dtype=np.int64)
    plen = np.asarray([s.prompt_len for s in samples], dtype=np.int64)
    has = (p_of >= rstart[s_of]) & (p_of < n[s_of] - 1)
    row_off = np.concatenate(([0], np.cumsum([s.rows for s in samples])[:-1])).astype(np.int64)
    src = row_off[s_of] + p_of - rstart[s_of]
    native = p_of < rstart[s_of] if rstart.any() else None
    if any(s.native is not None for s in samples):
        marks = np.concatenate([np.zeros(s.rows, bool) if s.native is None else
                                np.asarray(s.native, dtype=bool) for s in samples])
        marked = np.zeros_like(has)
        marked[has] = marks[src[has]]
        has &= ~marked
        native = marked if native is None else native | marked

    dtype = geometry.id_dtype
    ids = np.empty((gidx.size, len(layers), geometry.top_k), dtype=dtype)
    if has.any():
        table = samples[0].routed if len(samples) == 1 else np.concatenate(
            [s.routed for s in samples]
        )
        ids[has] = table[src[has][:, None], slots[None, :]]
    if not has.all():
        ids[~has] = pad_ids(gidx[~has], layers, geometry.top_k, geometry.num_experts, dtype)
    if validate and has.any():
        _validate_before(ids, samples, s_of, p_of, layers, geometry.num_experts)
    region = np.where(has, np.where(p_of < plen[s_of], PROMPT, COMPLETION), PAD).astype(np.int8)
    if native is not None:
        region[native] = NATIVE
    return HostRouting(
        ids=ids,
        region=region,
        layers=layers,
        sample_ids=tuple(s.sample_id for s in samples),
        cu_seqlens_padded=np.concatenate(([0], np.cumsum(padded))).astype(np.int32),
    )


def _validate_before(
    ids: np.ndarray,
    samples: Sequence[RoutedSample],
    s_of: np.ndarray,
    p_of: np.ndarray,
    layers: Sequence[int],
    num_experts: int,
) -> None:
    """Raise on the first out-of-range or repeated id, naming sample, position and layer.
    Pad and native rows hold pad ids, in range and distinct by construction, so the whole
    array is checked."""
    if int(ids.max(initial=0)) >= num_experts:
        bad, rule = (ids >= num_experts).any(axis=-1), f"an expert id outside [0, {num_experts})"
    elif has_repeated_ids(ids):
        bad, rule = repeated_ids(ids), "a repeated expert id (top-k ids must be distinct)"
    else:
        return
    t, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise LayoutError(
        f"sample {samples[int(s_of[t])].sample_id!r}, token position {int(p_of[t])}, "
        f"layer {layers[j]}: {rule}: {ids[t, j].tolist()} "
        f"({int(bad.sum())} bad blocks in this micro-batch on this rank)"
    )

