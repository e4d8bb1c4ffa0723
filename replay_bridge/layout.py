"""Micro-batch layout: rollout routing rows -> one index array per local MoE router, in the
router's token order.

Pure NumPy, vectorised over tokens and layers; knows nothing of torch or any trainer (the
Megatron hook, ``trainer_hooks.megatron``, re-exports these names; the rank loader,
:mod:`replay_bridge.loader`, lays its micro-batches out with them).
The steps, in the order Megatron applies them to a batch:

1. every sample gets one row per token position: its stored rows, plus pad rows where the
   rollout has none (the last position, padding) and native rows, which the trainer routes
   with the router's own top-k (positions before ``routed_start`` and rows the sample marks
   :attr:`~replay_bridge.sample.RoutedSample.native`; their ids are pad ids);
2. samples are laid out as a ``bshd`` batch (each padded to ``seq_length``) or packed ``thd``
   (concatenated, each padded to a multiple of ``pad_multiple``);
3. context parallel keeps chunks ``r`` and ``2*cp - 1 - r`` of ``2*cp`` chunks of each sequence;
4. the router input is sequence-major: ``bshd`` row ``s * b + b_idx``; ``thd`` is one sequence;
5. sequence parallel keeps this tensor-parallel rank's contiguous ``1/tp`` slice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from replay_bridge.checks import has_repeated_ids, repeated_ids
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample

__all__ = [
    "PROMPT",
    "COMPLETION",
    "PAD",
    "NATIVE",
    "HostRouting",
    "LayoutError",
    "MissingSample",
    "Packing",
    "RankSlice",
    "layout_routing",
    "lookup_samples",
    "pad_ids",
]

PROMPT, COMPLETION, PAD, NATIVE = 0, 1, 2, 3
"""Region codes of a router token: rollout routing at a prompt or completion position; a pad
row (no rollout routing and none needed: the last position, padding); a native row (no rollout
routing, routed with the router's own top-k: before ``routed_start``, or marked native)."""


class LayoutError(ValueError):
    """A micro-batch whose samples cannot be laid out as asked."""


class MissingSample(LayoutError, KeyError):
    """A sample id that the routing source does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Packing:
    """How the trainer lays samples out in a micro-batch.

    ``bshd``: one row per sample, right-padded to ``seq_length`` tokens.
    ``thd``: samples concatenated (``cu_seqlens``), each padded to a multiple of
    ``pad_multiple`` (Megatron needs ``2 * cp``, times ``tp`` with sequence parallel), then the
    whole pack padded to a multiple of ``pad_total_multiple``.
    """

    format: Literal["bshd", "thd"] = "thd"
    seq_length: int | None = None
    pad_multiple: int = 1
    pad_total_multiple: int = 1

    @classmethod
    def bshd(cls, seq_length: int) -> Packing:
        return cls("bshd", seq_length=seq_length)

    @classmethod
    def thd(cls, pad_multiple: int = 1, pad_total_multiple: int = 1) -> Packing:
        return cls("thd", pad_multiple=pad_multiple, pad_total_multiple=pad_total_multiple)

    def __post_init__(self) -> None:
        if self.format not in ("bshd", "thd"):
            raise LayoutError(f"packing format must be 'bshd' or 'thd', got {self.format!r}")
        if self.format == "bshd" and (self.seq_length is None or self.seq_length <= 0):
            raise LayoutError("bshd packing needs a positive seq_length")
        if self.pad_multiple < 1 or self.pad_total_multiple < 1:
            raise LayoutError("pad multiples must be >= 1")

    def padded_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Per-sequence padded lengths for the given token counts."""
        if self.format == "bshd":
            return np.full_like(lengths, self.seq_length)
        m = self.pad_multiple
        return -(-lengths // m) * m

    def pack_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Each sequence's length as laid out in one micro-batch: :meth:`padded_lengths`, and
        under ``thd`` the last sequence also takes the pack's padding to
        ``pad_total_multiple``."""
        padded = self.padded_lengths(np.asarray(lengths, dtype=np.int64))
        if self.format == "thd" and self.pad_total_multiple > 1 and padded.size:
            padded[-1] += -int(padded.sum()) % self.pad_total_multiple
        return padded


@dataclass(frozen=True)
class RankSlice:
    """Which part of the token axis this rank's routers see."""

    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    cp_size: int = 1
    cp_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.cp_rank < self.cp_size:
            raise LayoutError(f"rank out of range in {self}")


@dataclass
class HostRouting:
    """One micro-batch's routing for this rank, on the host.

    ``ids`` is ``[tokens, local_moe_layers, top_k]`` in the geometry's id dtype, tokens in the
    router's order; ``region`` is ``int8 [tokens]`` (:data:`PROMPT`, :data:`COMPLETION`,
    :data:`PAD`, :data:`NATIVE`); ``layers`` are the wire layer indices of the ``ids`` layer
    axis. Pad and native rows hold pad ids (:func:`pad_ids`).
    """

    ids: np.ndarray
    region: np.ndarray
    layers: tuple[int, ...]
    sample_ids: tuple[str, ...]
    cu_seqlens_padded: np.ndarray
    """Global (pre-CP) offsets of the padded sequences: what the trainer packs with."""

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def native(self) -> np.ndarray:
        """``bool [tokens]``: tokens the router routes with its own top-k."""
        return self.region == NATIVE

    @property
    def has_native(self) -> bool:
        return bool(self.native.any())


def lookup_samples(
    items: Sequence[RoutedSample | str], source: Mapping[str, RoutedSample] | None
) -> list[RoutedSample]:
    """Resolve sample ids through ``source``; routed samples pass through."""
    out: list[RoutedSample] = []
    for i, it in enumerate(items):
        if isinstance(it, RoutedSample):
            out.append(it)
            continue
        if source is None:
            raise LayoutError(
                f"micro-batch item {i} is the sample id {it!r} but no routing source was given"
            )
        try:
            out.append(source[it])
        except KeyError:
            raise MissingSample(
                f"sample {it!r} (micro-batch item {i}) is not in the routing source"
            ) from None
    return out


def pad_ids(
    global_index: np.ndarray, layers: Sequence[int], top_k: int, num_experts: int, dtype: np.dtype
) -> np.ndarray:
    """Pad rows ``[n, len(layers), top_k]``: k distinct experts per row, consecutive pad tokens
    on consecutive disjoint blocks of experts, so padding spreads over every expert (and every
    expert-parallel rank) instead of piling onto one."""
    g = global_index.astype(np.int64)[:, None, None]
    lay = np.asarray(layers, dtype=np.int64)[None, :, None]
    kk = np.arange(top_k, dtype=np.int64)[None, None, :]
    return ((g * top_k + lay * 5 + kk) % num_experts).astype(dtype)


def _check_rows(samples: Sequence[RoutedSample], geometry: RoutingGeometry) -> None:
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


def layout_routing(
    samples: Sequence[RoutedSample],
    geometry: RoutingGeometry,
    packing: Packing,
    rank: RankSlice = RankSlice(),
    layers: Sequence[int] | None = None,
    seq_lengths: Sequence[int] | None = None,
    validate: bool = True,
    *,
    clock: list[tuple[str, float]] | None = None,
) -> HostRouting:
    """Lay out one micro-batch's routing for this rank's routers.

    ``layers``: the wire layer indices of this rank's routers (all MoE layers by default).
    ``seq_lengths``: the trainer's own token count per sample, checked against the samples.
    ``validate``: refuse ids outside ``[0, num_experts)`` and blocks with a repeated id (the
    all-to-all dispatcher crashes on them, the all-gather one silently merges them). Stored ids
    of native rows are never read: those rows take pad ids.

    Stored rows are copied as slices (one per sample and contiguous run) where the token order
    allows (``thd`` under any slicing; ``bshd`` without context or sequence parallel), else by
    one row gather; the output is the same either way. ``clock``: a list that gets
    ``(stage, time.perf_counter())`` at the end of each stage (``bench layout``'s breakdown).
    """
    return _layout(samples, geometry, packing, rank, layers, seq_lengths, validate, fast=True,
                   clock=clock)


def _layout(
    samples: Sequence[RoutedSample],
    geometry: RoutingGeometry,
    packing: Packing,
    rank: RankSlice,
    layers: Sequence[int] | None,
    seq_lengths: Sequence[int] | None,
    validate: bool,
    fast: bool,
    clock: list[tuple[str, float]] | None = None,
) -> HostRouting:
    """:func:`layout_routing`; ``fast=False`` copies stored rows by the row gather alone (the
    general path, which the tests hold the slice copies against)."""
    if not samples:
        raise LayoutError("a micro-batch needs at least one sample")
    _check_rows(samples, geometry)
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
    stored = (p_of >= rstart[s_of]) & (p_of < n[s_of] - 1)  # a stored row exists
    row_off = np.concatenate(([0], np.cumsum([s.rows for s in samples])[:-1])).astype(np.int64)
    src = row_off[s_of] + p_of - rstart[s_of]
    native = p_of < rstart[s_of] if rstart.any() else None
    has = stored
    if any(s.native is not None for s in samples):
        marks = np.concatenate([np.zeros(s.rows, bool) if s.native is None else
                                np.asarray(s.native, dtype=bool) for s in samples])
        marked = np.zeros_like(stored)
        marked[stored] = marks[src[stored]]
        has = stored & ~marked
        native = marked if native is None else native | marked

    if clock is not None:
        clock.append(("index", time.perf_counter()))
    dtype = geometry.id_dtype
    ids = np.empty((gidx.size, len(layers), geometry.top_k), dtype=dtype)
    if has.any():
        sel = _layer_selection(slots, geometry.num_moe_layers)
        if not (fast and _copy_runs(ids, samples, sel, packing, rank, stored, s_of, p_of,
                                    src, row_off)):
            _gather_rows(ids, samples, sel, has, src)
    if clock is not None:
        clock.append(("gather", time.perf_counter()))
    if not has.all():
        fill = np.flatnonzero(~has)
        ids[fill] = _pad_rows(gidx[fill], layers, geometry.top_k, geometry.num_experts, dtype)
    if clock is not None:
        clock.append(("pad", time.perf_counter()))
    if validate and has.any():
        used = np.flatnonzero(has)
        _validate(ids, int(used[0]), int(used[-1]) + 1, samples, s_of, p_of, layers,
                  geometry.num_experts)
    if clock is not None:
        clock.append(("validate", time.perf_counter()))
    region = np.where(has, np.where(p_of < plen[s_of], PROMPT, COMPLETION), PAD).astype(np.int8)
    if native is not None:
        region[native] = NATIVE
    if clock is not None:
        clock.append(("region", time.perf_counter()))
    return HostRouting(
        ids=ids,
        region=region,
        layers=layers,
        sample_ids=tuple(s.sample_id for s in samples),
        cu_seqlens_padded=np.concatenate(([0], np.cumsum(padded))).astype(np.int32),
    )


def _layer_selection(slots: np.ndarray, num_moe_layers: int) -> slice | np.ndarray:
    """The stored layer axis this rank reads: a slice when its layers are one ascending run
    (every layer, or a pipeline stage's), so copies stay plain strided copies."""
    if slots.size and (np.diff(slots) == 1).all():
        return slice(int(slots[0]), int(slots[-1]) + 1)
    return slots


def _copy_runs(
    ids: np.ndarray,
    samples: Sequence[RoutedSample],
    sel: slice | np.ndarray,
    packing: Packing,
    rank: RankSlice,
    stored: np.ndarray,
    s_of: np.ndarray,
    p_of: np.ndarray,
    src: np.ndarray,
    row_off: np.ndarray,
) -> bool:
    """Copy stored rows into ``ids`` as slice copies, one per run of router tokens that read
    consecutive rows of one sample (``thd``: one or two per sample and rank; ``bshd`` without
    context or sequence parallel: one strided copy per sample). Rows marked native are copied
    too and overwritten with pad ids afterwards. Returns ``False`` (nothing copied) when the
    layout has no such few runs; the caller then gathers row by row."""
    if packing.format == "bshd":
        if rank.cp_size > 1 or (rank.sequence_parallel and rank.tp_size > 1):
            return False
        by_pos = ids.reshape(-1, len(samples), *ids.shape[1:])  # [position, sample, ...]
        for i, s in enumerate(samples):
            if s.rows:
                by_pos[s.routed_start : s.routed_start + s.rows, i] = s.routed[:, sel]
        return True
    t = stored.size
    cont = np.zeros(t, dtype=bool)  # token t continues the run of token t - 1
    if t > 1:
        cont[1:] = stored[1:] & stored[:-1] & (src[1:] == src[:-1] + 1) & (s_of[1:] == s_of[:-1])
    begins = np.flatnonzero(stored & ~cont)
    if begins.size > 4 * len(samples) + 8:
        return False
    ends = np.flatnonzero(stored & ~np.append(cont[1:], False)) + 1
    for a, b in zip(begins.tolist(), ends.tolist()):
        i = int(s_of[a])
        r = int(src[a] - row_off[i])
        ids[a:b] = samples[i].routed[r : r + b - a, sel]
    return True


def _gather_rows(
    ids: np.ndarray,
    samples: Sequence[RoutedSample],
    sel: slice | np.ndarray,
    has: np.ndarray,
    src: np.ndarray,
) -> None:
    """Copy stored rows into ``ids`` by one row gather over every sample's rows (any token
    order). Rows without one get row 0 and are overwritten by the caller."""
    parts = [s.routed[:, sel] for s in samples]
    table = parts[0] if len(parts) == 1 else np.concatenate(parts)
    table = np.ascontiguousarray(table).reshape(table.shape[0], -1)
    rows = np.where(has, src, 0)
    np.take(table, rows, axis=0, out=ids.reshape(ids.shape[0], -1), mode="clip")


def _pad_rows(
    global_index: np.ndarray, layers: Sequence[int], top_k: int, num_experts: int,
    dtype: np.dtype,
) -> np.ndarray:
    """:func:`pad_ids` of ``global_index``, from one period of pad rows: the rows repeat every
    ``num_experts / gcd(top_k, num_experts)`` tokens, so a micro-batch computes that many."""
    period = num_experts // math.gcd(top_k, num_experts)
    if period >= global_index.size:
        return pad_ids(global_index, layers, top_k, num_experts, dtype)
    table = pad_ids(np.arange(period), layers, top_k, num_experts, dtype)
    return table[global_index % period]


def _validate(
    ids: np.ndarray,
    lo: int,
    hi: int,
    samples: Sequence[RoutedSample],
    s_of: np.ndarray,
    p_of: np.ndarray,
    layers: Sequence[int],
    num_experts: int,
) -> None:
    """Raise on the first out-of-range or repeated id, naming sample, position and layer.
    Router tokens ``[lo, hi)`` span every stored row; pad and native rows hold pad ids, in
    range and distinct by construction, so the span is checked whole, in the ids' own dtype
    (range: one maximum, skipped when the dtype cannot exceed it; repeats: the vectorised
    scan of :func:`~replay_bridge.checks.has_repeated_ids`). Masks are built only to name a
    fault."""
    span = ids[lo:hi]
    if np.iinfo(ids.dtype).max >= num_experts and int(span.max(initial=0)) >= num_experts:
        bad, rule = (ids >= num_experts).any(axis=-1), f"an expert id outside [0, {num_experts})"
    elif has_repeated_ids(span):
        bad, rule = repeated_ids(ids), "a repeated expert id (top-k ids must be distinct)"
    else:
        return
    t, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise LayoutError(
        f"sample {samples[int(s_of[t])].sample_id!r}, token position {int(p_of[t])}, "
        f"layer {layers[j]}: {rule}: {ids[t, j].tolist()} "
        f"({int(bad.sum())} bad blocks in this micro-batch on this rank)"
    )
