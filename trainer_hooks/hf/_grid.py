"""Lay a micro-batch's routing out on a Hugging Face model's token grid.

A ``transformers`` MoE block flattens its hidden states batch-major: router row
``b * seq + s`` is batch row ``b``, column ``s``. Two ways of filling that grid are covered:

- **padded**: one sample per batch row, its tokens contiguous, the rest padding (left or right),
  as an ``attention_mask`` ``[batch, seq]`` says;
- **packed**: samples concatenated in the rows (flash-attention varlen training: one row,
  ``position_ids`` restarting at 0 for each sequence), optionally with an ``attention_mask``
  marking padding.

Either gives each sample a span (first flat grid row, token count). The samples are laid out
by the library's :func:`~replay_bridge.layout.layout_routing` as one unpadded THD pack (which
finds pad and native rows, checks the token counts and validates the ids), then scattered into
the grid in one vectorised step; grid rows no sample covers are :data:`PAD`.

Ulysses-style sequence parallelism (DeepSpeed-Ulysses, as verl and VeOmni use it: each rank
holds a contiguous ``1/sp`` of every row's columns through the MLP/MoE layers, all-to-all around
attention) is a column slice of that grid (:func:`sequence_slice`): rank ``r``'s routers see
``[batch, seq/sp]``, row ``b * (seq/sp) + j`` being column ``r * seq/sp + j`` of row ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import (
    PAD,
    HostRouting,
    LayoutError,
    Packing,
    RankSlice,
    layout_routing,
    pad_ids,
)
from replay_bridge.sample import RoutedSample

__all__ = ["Spans", "grid_routing", "packed_spans", "padded_spans", "sequence_slice"]


@dataclass(frozen=True)
class Spans:
    """Where each sequence of a batch lies on the flattened ``[batch * seq]`` grid."""

    shape: tuple[int, int]
    starts: np.ndarray
    """``int64 [sequences]``: flat grid row of each sequence's first token."""
    lengths: np.ndarray
    """``int64 [sequences]``: its token count."""

    @property
    def num_rows(self) -> int:
        return self.shape[0] * self.shape[1]


def _as_2d(name: str, value: object) -> np.ndarray:
    a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise LayoutError(f"{name} must be [batch, seq] (or [seq]), got shape {tuple(a.shape)}")
    return a


def padded_spans(attention_mask: object) -> Spans:
    """One sequence per batch row: the row's valid (non-zero) mask positions, which must be
    contiguous (left or right padding, or none)."""
    m = _as_2d("attention_mask", attention_mask) != 0
    b, s = m.shape
    lengths = m.sum(axis=1).astype(np.int64)
    first = np.argmax(m, axis=1).astype(np.int64)
    runs = (np.diff(m.astype(np.int8), axis=1, prepend=0) == 1).sum(axis=1)
    bad = np.flatnonzero(runs > 1)
    if bad.size:
        raise LayoutError(
            f"attention_mask row {int(bad[0])} has its valid tokens in {int(runs[bad[0]])} "
            "separate runs: a padded batch needs each row's tokens contiguous (for several "
            "sequences in one row use packed sequences with position_ids)"
        )
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise LayoutError(f"attention_mask row {int(empty[0])} has no valid token")
    return Spans((b, s), np.arange(b, dtype=np.int64) * s + first, lengths)


def packed_spans(position_ids: object, attention_mask: object | None = None) -> Spans:
    """Sequences packed in rows: each starts where ``position_ids`` is 0 and runs to the next
    start, the first masked-out position or the row's end. Every valid token must belong to a
    sequence that starts in its own row."""
    pos = _as_2d("position_ids", position_ids)
    b, s = pos.shape
    if attention_mask is None:
        valid = np.ones((b, s), dtype=bool)
    else:
        valid = _as_2d("attention_mask", attention_mask) != 0
        if valid.shape != pos.shape:
            raise LayoutError(
                f"attention_mask {tuple(valid.shape)} and position_ids {tuple(pos.shape)} "
                "differ in shape"
            )
    start = valid & (pos == 0)
    prev_valid = np.zeros_like(valid)
    prev_valid[:, 1:] = valid[:, :-1]
    orphan = valid & ~start & ~prev_valid
    if orphan.any():
        r, c = (int(x[0]) for x in np.nonzero(orphan))
        raise LayoutError(
            f"packed batch row {r}, column {c}: a token that continues no sequence (position_ids "
            f"{int(pos[r, c])} after padding or a row start; each packed sequence starts at "
            "position 0)"
        )
    flat_start = np.flatnonzero(start.reshape(-1))
    flat_valid = valid.reshape(-1)
    seq = np.cumsum(start.reshape(-1)) - 1
    lengths = np.bincount(seq[flat_valid], minlength=flat_start.size).astype(np.int64)
    return Spans((b, s), flat_start.astype(np.int64), lengths)


def grid_routing(
    samples: Sequence[RoutedSample],
    geometry: RoutingGeometry,
    layers: Sequence[int],
    spans: Spans,
    *,
    validate: bool = True,
) -> HostRouting:
    """``samples`` (in the order of the spans) laid out on the grid: ``ids``
    ``[batch * seq, len(layers), top_k]`` and ``region`` ``int8 [batch * seq]``, grid rows no
    sample covers :data:`PAD` with pad ids. ``cu_seqlens_padded`` holds each sample's first
    flat grid row, then ``batch * seq``."""
    if len(samples) != spans.starts.size:
        raise LayoutError(
            f"the batch holds {spans.starts.size} sequences, the micro-batch lists "
            f"{len(samples)} samples"
        )
    thd = layout_routing(samples, geometry, Packing.thd(), RankSlice(), layers,
                         seq_lengths=spans.lengths.tolist(), validate=validate)
    total = spans.num_rows
    n = spans.lengths
    offsets = np.concatenate(([0], np.cumsum(n)[:-1]))
    dest = np.repeat(spans.starts - offsets, n) + np.arange(int(n.sum()), dtype=np.int64)
    ids = np.empty((total, len(layers), geometry.top_k), dtype=thd.ids.dtype)
    region = np.full(total, PAD, dtype=np.int8)
    ids[dest] = thd.ids
    region[dest] = thd.region
    free = np.ones(total, dtype=bool)
    free[dest] = False
    if free.any():
        ids[free] = pad_ids(np.flatnonzero(free), layers, geometry.top_k, geometry.num_experts,
                            ids.dtype)
    return HostRouting(
        ids=ids,
        region=region,
        layers=tuple(layers),
        sample_ids=thd.sample_ids,
        cu_seqlens_padded=np.append(spans.starts, total).astype(np.int64),
    )


def sequence_slice(
    host: HostRouting, shape: tuple[int, int], sp_size: int, sp_rank: int
) -> tuple[HostRouting, tuple[int, int]]:
    """Rank ``sp_rank``'s part of a grid laid out for the whole ``[batch, seq]`` batch under
    Ulysses-style sequence parallelism of ``sp_size``: columns ``[sp_rank * seq/sp_size,
    (sp_rank + 1) * seq/sp_size)`` of every row, batch-major, and the new grid shape
    ``(batch, seq/sp_size)``. ``seq`` must be a multiple of ``sp_size`` (Ulysses pads the
    batch to one). ``cu_seqlens_padded`` keeps the whole grid's offsets."""
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise LayoutError(f"sequence-parallel rank {sp_rank} of {sp_size} is out of range")
    if sp_size == 1:
        return host, shape
    b, s = shape
    if s % sp_size:
        raise LayoutError(
            f"sequence length {s} is not a multiple of the sequence-parallel size {sp_size}: "
            "pad the batch to a multiple first (as Ulysses does), marking the padding in the "
            "attention_mask"
        )
    w = s // sp_size
    cols = slice(sp_rank * w, (sp_rank + 1) * w)
    tail = host.ids.shape[1:]
    ids = np.ascontiguousarray(host.ids.reshape(b, s, *tail)[:, cols].reshape(b * w, *tail))
    region = np.ascontiguousarray(host.region.reshape(b, s)[:, cols].reshape(b * w))
    return replace(host, ids=ids, region=region), (b, w)
