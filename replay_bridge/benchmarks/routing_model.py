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
        self._alias_prob, self._alias = _alias_tables(p)

    def _draw(self, shape: tuple[int, ...], layer: np.ndarray) -> np.ndarray:
        """Experts drawn by popularity; ``layer`` (broadcast to ``shape``) picks the table."""
        e = self.geometry.num_experts
        j = (self.rng.random(shape, dtype=np.float32) * e).astype(np.int32)
        np.minimum(j, e - 1, out=j)
        keep = self.rng.random(shape, dtype=np.float32) < self._alias_prob[layer, j]
        return np.where(keep, j, self._alias[layer, j])

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


def _alias_tables(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias tables per row of ``p [layers, experts]`` (setup only, not per draw)."""
    m, e = p.shape
    prob = np.zeros((m, e), dtype=np.float32)
    alias = np.zeros((m, e), dtype=np.int32)
    for layer in range(m):
        scaled = p[layer] * e
        small = [i for i in range(e) if scaled[i] < 1.0]
        large = [i for i in range(e) if scaled[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[layer, s], alias[layer, s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        for i in small + large:
            prob[layer, i], alias[layer, i] = 1.0, i
    return prob, alias
