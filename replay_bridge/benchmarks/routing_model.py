"""Realistic synthetic routing for storage benchmarks.

Per MoE layer, expert popularity follows a Zipf law over a random permutation of the experts
(hot experts differ by layer); each (token, layer, slot) keeps the previous token's expert with
probability ``stickiness`` (neighbouring tokens share experts), else draws afresh; a block's k
ids are distinct (repeats are redrawn) and kept in draw order, so popular experts tend to come
first, as in an engine's score order. Everything is vectorised over chunks of tokens.
"""

from __future__ import annotations

import numpy as np

from ..geometry import RoutingGeometry

__all__ = ["RoutingModel"]

_CHUNK_TOKENS = 1 << 14
_TABLE_BINS = 1 << 16


class RoutingModel:
    """Draws ``[rows, num_moe_layers, top_k]`` routing in the geometry's id dtype."""

    def __init__(self, geometry: RoutingGeometry, *, zipf_s: float = 0.5,
                 stickiness: float = 0.3, seed: int = 0) -> None:
        self.geometry = geometry
        self.stickiness = float(stickiness)
        self.rng = np.random.default_rng(seed)
        m, e = geometry.num_moe_layers, geometry.num_experts
        weights = 1.0 / np.arange(1, e + 1, dtype=np.float64) ** zipf_s
        perms = np.argsort(self.rng.random((m, e)), axis=1)  # expert holding each rank
        p = np.empty((m, e))
        np.put_along_axis(p, perms, np.broadcast_to(weights / weights.sum(), (m, e)), axis=1)
        self.popularity = p
        self._table = _inverse_cdf_table(p)

    def _draw(self, shape: tuple[int, ...], layer: np.ndarray) -> np.ndarray:
        """Experts drawn by popularity; ``layer`` (broadcast to ``shape``) picks the table."""
        u = self.rng.integers(0, _TABLE_BINS, size=shape, dtype=np.int32)
        return self._table[layer, u]

    def routing(self, rows: int) -> np.ndarray:
        g = self.geometry
        out = np.empty((rows, g.num_moe_layers, g.top_k), dtype=g.id_dtype)
        prev = None
        for lo in range(0, rows, _CHUNK_TOKENS):
            chunk = self._chunk(min(_CHUNK_TOKENS, rows - lo), prev)
            out[lo : lo + chunk.shape[0]] = chunk
            prev = chunk[-1]
        return out

    def _chunk(self, t: int, prev: np.ndarray | None) -> np.ndarray:
        m, k = self.geometry.num_moe_layers, self.geometry.top_k
        layer = np.arange(m, dtype=np.int32)[None, :, None]
        fresh = self._draw((t, m, k), np.broadcast_to(layer, (t, m, k)))
        if prev is not None:
            fresh = np.concatenate([prev[None].astype(fresh.dtype), fresh])
        # runs: a slot keeps the value of its last change point
        change = self.rng.random(fresh.shape, dtype=np.float32) >= self.stickiness
        change[0] = True
        pos = np.where(change, np.arange(fresh.shape[0], dtype=np.int32)[:, None, None], 0)
        np.maximum.accumulate(pos, axis=0, out=pos)
        ids = np.take_along_axis(fresh, pos, axis=0)
        if prev is not None:
            ids = ids[1:]
        self._dedup(ids)
        return ids

    def _dedup(self, ids: np.ndarray) -> None:
        """Redraw every id that repeats an earlier slot of its block, until none does."""
        m, k = self.geometry.num_moe_layers, self.geometry.top_k
        blocks = ids.reshape(-1, k)
        layer_of = np.tile(np.arange(m, dtype=np.int32), ids.shape[0])
        todo = np.arange(blocks.shape[0])
        while todo.size:
            b = blocks[todo]
            dup = np.zeros(b.shape, dtype=bool)
            for j in range(1, k):  # k-1 vector compares over all blocks
                dup[:, j] = (b[:, :j] == b[:, j : j + 1]).any(axis=1)
            rows, cols = np.nonzero(dup)
            if rows.size == 0:
                break
            blocks[todo[rows], cols] = self._draw((rows.size,), layer_of[todo[rows]])
            todo = np.unique(todo[rows])


def _inverse_cdf_table(p: np.ndarray) -> np.ndarray:
    """``int32 [layers, _TABLE_BINS]``: the expert at each quantile of each layer's popularity
    (a draw is one gather; quantisation moves each probability by at most 1 / _TABLE_BINS)."""
    m, e = p.shape
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0
    shifted = (cdf + np.arange(m)[:, None]).reshape(-1)  # one sorted array for all layers
    q = (np.arange(_TABLE_BINS) + 0.5) / _TABLE_BINS
    idx = np.searchsorted(shifted, (q[None, :] + np.arange(m)[:, None]).reshape(-1))
    return (idx.reshape(m, _TABLE_BINS) - np.arange(m)[:, None] * e).astype(np.int32)
