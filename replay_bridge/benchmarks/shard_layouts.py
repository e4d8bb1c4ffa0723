"""``bench shard-layouts``: a measured study of candidate routing layouts for a next shard format.

The stored format does not change here. The same routing (realistic: per-layer Zipf skew and
correlated neighbouring tokens, from :class:`RoutingModel`; and uniform random, the worst case)
is cut into record batches of ~2 MiB of routing, encoded in each candidate layout as Arrow IPC
(file format, in memory: like a shard in the page cache), with each codec, and read back to a
NumPy ``[rows, num_moe_layers, top_k]`` array in engine order. Every variant's decode is checked
to give exactly the input ids, in order. Reads and writes are timed in interleaved rounds
(every variant once per round, so that each sees the same machine load); figures are medians.

Layouts (``buffers`` of one record batch; each buffer is one ``list<uint8|uint16>`` column of
one row, so each is one compressed Arrow buffer):

- ``flat``: today's format 3: ``[rows, layers, k]`` row-major.
- ``layer-major``: ``[layers, rows, k]``: one layer's ids together.
- ``layer-slot-major``: ``[layers, k, rows]``: one slot of one layer over the tokens.
- ``per-layer``: one column per layer, ``[rows, k]`` each (own compressed buffer each).
- ``sorted+perm``: each block's ids sorted (layer-major) plus its engine order as the Lehmer
  code of the permutation (``uint16``: 8! = 40320) in its own column.
- ``sorted-delta+perm``: the same with the sorted ids stored as first id, then gaps - 1.
- ``bitmap+perm``: a ``num_experts``-bit set per block (16 B for 128 experts) plus the code.
- ``packed7`` (<= 128 experts): the 8 ids of a block as 56 bits (7 bytes), layer-major.
- ``bitshuffle``: layer-major bytes, transposed into bit planes (the top plane is 0).
- ``repeat0`` (< 256 experts): layer-slot-major, ``0`` where a slot repeats the previous
  token's id of that layer and slot, else ``id + 1``.
- ``repeat-lm``: the same as ``repeat-mask`` in layer-major order, decoded straight into
  ``[rows, layers, k]`` by a small C kernel built at run time (what a reader would ship).
- ``ref-lm``: like ``repeat-lm`` but an id found anywhere in the previous token's block is a
  reference to that slot (stored as (slot - own slot) mod k, one byte per reference): robust to
  shared experts that change slot between tokens.
- ``repeat-mask``: a bit per id (``packbits``) for "repeats the previous token's id of this
  layer and slot" plus the ids that do not repeat, layer-slot-major.
"""

from __future__ import annotations

import functools

import io
import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from ..geometry import RoutingGeometry
from .routing_model import RoutingModel

__all__ = ["LAYOUTS", "DEFAULT_VARIANTS", "decode", "encode", "run", "uniform_routing"]

BATCH_BYTES = 2 << 20

# ---------------------------------------------------------------------------------------------
# layouts: encode [n, L, k] -> {name: 1-D array}; decode back to [n, L, k] in engine order


def _layer_major(ids: np.ndarray) -> np.ndarray:
    """``[n, L, k]`` -> contiguous ``[L, n, k]`` (the inverse of :func:`_to_rows`)."""
    return np.ascontiguousarray(ids.transpose(1, 0, 2))


def _to_rows(lmk: np.ndarray) -> np.ndarray:
    """``[L, n, k]`` -> contiguous ``[n, L, k]`` (blocks moved as whole 8- or 16-byte words)."""
    L, n, k = lmk.shape
    w = k * lmk.dtype.itemsize
    word = {8: np.uint64, 4: np.uint32, 2: np.uint16}.get(w)
    if word is not None:
        return lmk.view(word).reshape(L, n).T.copy().view(lmk.dtype).reshape(n, L, k)
    return np.ascontiguousarray(lmk.transpose(1, 0, 2))


def _fact(n: int) -> int:
    return math.factorial(n)


_PERM_TABLES: dict[int, np.ndarray] = {}


def _perm_table(k: int) -> np.ndarray:
    """``uint8 [k!, k]``: the rank vector (position in the sorted block) of each Lehmer code
    (the code of a permutation is its index in lexicographic order)."""
    t = _PERM_TABLES.get(k)
    if t is None:
        t = _PERM_TABLES[k] = np.array(list(itertools.permutations(range(k))), dtype=np.uint8)
    return t


def _lehmer(ids: np.ndarray) -> np.ndarray:
    """``[..., k]`` distinct ids -> Lehmer code of their order (``uint16`` for k <= 8)."""
    k = ids.shape[-1]
    code = np.zeros(ids.shape[:-1], dtype=np.int64)
    for j in range(k - 1):
        later = ids[..., j + 1 :]
        smaller = (later < ids[..., j : j + 1]).sum(-1)
        code += smaller * _fact(k - 1 - j)
    return code.astype(np.uint16 if k <= 8 else np.uint32)


def _unsort(sorted_ids: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Blocks of sorted ids + Lehmer codes -> ids in engine order (same shape)."""
    k = sorted_ids.shape[-1]
    ranks = _perm_table(k)[code]  # [..., k] uint8
    if k == 8 and sorted_ids.dtype == np.uint8:
        # each output slot: byte `rank` of the block's sorted ids read as one uint64
        words = sorted_ids.view(np.uint64)[..., 0]
        shifts = ranks.astype(np.uint64) << np.uint64(3)
        return (words[..., None] >> shifts).astype(np.uint8)
    return np.take_along_axis(sorted_ids, ranks.astype(np.intp), axis=-1)


def _prev_same_slot(sm: np.ndarray) -> np.ndarray:
    """``[L, k, n]``: whether each id equals the previous token's (first token: False)."""
    rep = np.zeros(sm.shape, dtype=bool)
    np.equal(sm[..., 1:], sm[..., :-1], out=rep[..., 1:])
    return rep


def _ffill(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Along the last axis: where ``keep`` is False, the last earlier value where it is True."""
    n = values.shape[-1]
    idx = np.where(keep, np.arange(n, dtype=np.int32), 0)
    np.maximum.accumulate(idx, axis=-1, out=idx)
    return np.take_along_axis(values, idx, axis=-1)


class Layout:
    name = ""
    engine_order = True
    doc = ""

    def applies(self, g: RoutingGeometry) -> bool:
        return True

    def encode(self, ids: np.ndarray, g: RoutingGeometry) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, bufs: dict[str, np.ndarray], n: int, g: RoutingGeometry) -> np.ndarray:
        raise NotImplementedError


class Flat(Layout):
    name, doc = "flat", "format 3 today: [rows, layers, k] row-major"

    def encode(self, ids, g):
        return {"routed": ids.reshape(-1)}

    def decode(self, bufs, n, g):
        return bufs["routed"].reshape(n, g.num_moe_layers, g.top_k)


class LayerMajor(Layout):
    name, doc = "layer-major", "[layers, rows, k] within a record batch"

    def encode(self, ids, g):
        return {"routed": _layer_major(ids).reshape(-1)}

    def decode(self, bufs, n, g):
        return _to_rows(bufs["routed"].reshape(g.num_moe_layers, n, g.top_k))


class LayerSlotMajor(Layout):
    name, doc = "layer-slot-major", "[layers, k, rows] within a record batch"

    def encode(self, ids, g):
        return {"routed": np.ascontiguousarray(ids.transpose(1, 2, 0)).reshape(-1)}

    def decode(self, bufs, n, g):
        lkn = bufs["routed"].reshape(g.num_moe_layers, g.top_k, n)
        return np.ascontiguousarray(lkn.transpose(2, 0, 1))


class PerLayer(Layout):
    name, doc = "per-layer", "one column per layer, [rows, k] each"

    def encode(self, ids, g):
        return {f"l{i}": np.ascontiguousarray(ids[:, i]).reshape(-1)
                for i in range(g.num_moe_layers)}

    def decode(self, bufs, n, g):
        out = np.empty((n, g.num_moe_layers, g.top_k), dtype=g.id_dtype)
        for i in range(g.num_moe_layers):
            out[:, i] = bufs[f"l{i}"].reshape(n, g.top_k)
        return out


class SortedPerm(Layout):
    name, doc = "sorted+perm", "sorted ids per block (layer-major) + uint16 Lehmer code"
    delta = False

    def encode(self, ids, g):
        lmk = _layer_major(ids)
        s = np.sort(lmk, axis=-1)
        if self.delta:
            d = s.copy()
            d[..., 1:] = s[..., 1:] - s[..., :-1] - 1
            s = d
        return {"sorted": s.reshape(-1), "perm": _lehmer(lmk).reshape(-1)}

    def decode(self, bufs, n, g):
        L, k = g.num_moe_layers, g.top_k
        s = bufs["sorted"].reshape(L, n, k)
        if self.delta:
            s = np.cumsum(s, axis=-1, dtype=s.dtype)
            s += np.arange(k, dtype=s.dtype)
        return _to_rows(_unsort(s, bufs["perm"].reshape(L, n)))


class SortedDeltaPerm(SortedPerm):
    name, doc = "sorted-delta+perm", "sorted ids as first + (gap - 1), layer-major + Lehmer code"
    delta = True


class BitmapPerm(Layout):
    name, doc = "bitmap+perm", "num_experts-bit set per block (layer-major) + Lehmer code"

    def encode(self, ids, g):
        lmk = _layer_major(ids)
        L, n, k = lmk.shape
        onehot = np.zeros((L, n, g.num_experts), dtype=bool)
        np.put_along_axis(onehot, lmk.astype(np.intp), True, axis=-1)
        return {"bitmap": np.packbits(onehot, axis=-1, bitorder="little").reshape(-1),
                "perm": _lehmer(lmk).reshape(-1)}

    def decode(self, bufs, n, g):
        L, k, e = g.num_moe_layers, g.top_k, g.num_experts
        bits = np.unpackbits(bufs["bitmap"].reshape(L * n, e // 8), axis=-1, bitorder="little")
        s = np.nonzero(bits)[1].astype(g.id_dtype).reshape(L, n, k)  # row-wise, ascending
        return _to_rows(_unsort(s, bufs["perm"].reshape(L, n)))


class Packed7(Layout):
    name, doc = "packed7", "8 ids of 7 bits = 7 bytes per block, layer-major"

    def applies(self, g):
        return g.num_experts <= 128 and g.top_k == 8

    def encode(self, ids, g):
        lmk = _layer_major(ids).astype(np.uint64)
        word = np.zeros(lmk.shape[:2], dtype=np.uint64)
        for j in range(8):
            word |= lmk[..., j] << np.uint64(7 * j)
        return {"packed": word.reshape(-1, 1).view(np.uint8)[:, :7].reshape(-1)}

    def decode(self, bufs, n, g):
        L = g.num_moe_layers
        raw = np.zeros((L * n, 8), dtype=np.uint8)
        raw[:, :7] = bufs["packed"].reshape(-1, 7)
        word = raw.view(np.uint64)[:, 0]
        out = np.empty((L * n, 8), dtype=np.uint8)
        for j in range(8):
            out[:, j] = (word >> np.uint64(7 * j)) & np.uint64(0x7F)
        return _to_rows(out.reshape(L, n, 8))


class BitShuffle(Layout):
    name, doc = "bitshuffle", "layer-major bytes transposed into bit planes"

    def encode(self, ids, g):
        b = _layer_major(ids).reshape(-1).view(np.uint8)
        bits = np.unpackbits(b).reshape(-1, 8)
        return {"planes": np.packbits(bits.T.reshape(-1))}

    def decode(self, bufs, n, g):
        L, k = g.num_moe_layers, g.top_k
        nbytes = L * n * k * g.id_dtype.itemsize
        bits = np.unpackbits(bufs["planes"]).reshape(8, nbytes)
        b = np.packbits(bits.T.reshape(-1))
        return _to_rows(b.view(g.id_dtype).reshape(L, n, k))


class Repeat0(Layout):
    name, doc = "repeat0", "layer-slot-major; 0 = same id as the previous token, else id + 1"

    def applies(self, g):
        return g.num_experts < 256 and g.id_dtype == np.uint8

    def encode(self, ids, g):
        sm = np.ascontiguousarray(ids.transpose(1, 2, 0))
        y = sm + np.uint8(1)
        y[_prev_same_slot(sm)] = 0
        return {"routed": y.reshape(-1)}

    def decode(self, bufs, n, g):
        y = bufs["routed"].reshape(g.num_moe_layers, g.top_k, n)
        full = _ffill(y, y != 0) - np.uint8(1)
        return np.ascontiguousarray(full.transpose(2, 0, 1))


class RepeatMask(Layout):
    name, doc = "repeat-mask", ("layer-slot-major; a bit per id for 'same as the previous "
                                "token' + the ids that change")

    def encode(self, ids, g):
        sm = np.ascontiguousarray(ids.transpose(1, 2, 0))
        rep = _prev_same_slot(sm)
        return {"mask": np.packbits(rep.reshape(-1)), "changed": sm[~rep]}

    def decode(self, bufs, n, g):
        L, k = g.num_moe_layers, g.top_k
        rep = np.unpackbits(bufs["mask"], count=L * k * n).view(bool).reshape(L, k, n)
        full = np.empty((L, k, n), dtype=g.id_dtype)
        keep = ~rep
        full[keep] = bufs["changed"]
        return np.ascontiguousarray(_ffill(full, keep).transpose(2, 0, 1))


_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__BMI2__) || defined(__SSSE3__)
#include <immintrin.h>
#endif
/* repeat-lm: mask bit i (bitorder little) set = same id as the previous token's id of this
   layer and slot; ids in [L, n, k] order; out is [n, L, k], written row by row. For k = 8 a
   block's mask is one byte: its new ids are scattered into place with one pdep (BMI2). */
static uint64_t expand[256];

void repeat_decode(const uint8_t *mask, const uint8_t *changed, int64_t nchanged,
                   uint8_t *out, int64_t L, int64_t n, int64_t k) {
    int64_t *cur = malloc(sizeof(int64_t) * L), c = 0, row = L * k;
    for (int64_t l = 0; l < L; l++) {  /* where each layer's changed ids start */
        cur[l] = c;
        if ((n * k) % 8 == 0)
            for (int64_t b = l * n * k / 8, e = (l + 1) * n * k / 8; b < e; b++)
                c += 8 - __builtin_popcount(mask[b]);
        else
            for (int64_t i = l * n * k, e = (l + 1) * n * k; i < e; i++)
                c += !((mask[i >> 3] >> (i & 7)) & 1);
    }
    if (!expand[255])
        for (int m = 0; m < 256; m++) {
            uint64_t x = 0;
            for (int b = 0; b < 8; b++) if (m >> b & 1) x |= (uint64_t)0xFF << (8 * b);
            expand[m] = x;
        }
    for (int64_t t = 0; t < n; t++) {
        uint8_t *o = out + t * row;
        for (int64_t l = 0; l < L; l++) {
            int64_t i = (l * n + t) * k, cl = cur[l];
#if defined(__BMI2__)
            if (k == 8 && t > 0 && cl + 8 <= nchanged) {
                uint64_t keep = expand[mask[i >> 3]], prev, src, v;
                memcpy(&prev, o + l * 8 - row, 8);
                memcpy(&src, changed + cl, 8);
                v = (prev & keep) | _pdep_u64(src, ~keep);
                memcpy(o + l * 8, &v, 8);
                cur[l] = cl + 8 - __builtin_popcount(mask[i >> 3]);
                continue;
            }
#endif
            for (int64_t s = 0; s < k; s++, i++) {
                int r = (mask[i >> 3] >> (i & 7)) & 1;
                o[l * k + s] = r ? o[l * k + s - row] : changed[cl];
                cl += !r;
            }
            cur[l] = cl;
        }
    }
    free(cur);
}

/* ref-lm: per id (layer-major [L, n, k] order) a mask bit (little) = the id is in the previous
   token's block of this layer, at slot (s + d) % k with d from `refs` (one byte per such id);
   else the next of `changed`. out is [n, L, k], written row by row. */
void ref_decode(const uint8_t *restrict mask, const uint8_t *restrict refs, int64_t nrefs,
                const uint8_t *restrict changed, int64_t nchanged, uint8_t *restrict out,
                int64_t L, int64_t n, int64_t k) {
    if (!expand[255])
        for (int m = 0; m < 256; m++) {
            uint64_t x = 0;
            for (int b = 0; b < 8; b++) if (m >> b & 1) x |= (uint64_t)0xFF << (8 * b);
            expand[m] = x;
        }
    int64_t *cur = malloc(sizeof(int64_t) * 2 * L), c = 0, f = 0, row = L * k;
    for (int64_t l = 0; l < L; l++) {
        cur[2 * l] = c; cur[2 * l + 1] = f;
        if ((n * k) % 8 == 0)
            for (int64_t b = l * n * k / 8, e = (l + 1) * n * k / 8; b < e; b++) {
                int p = __builtin_popcount(mask[b]);
                f += p; c += 8 - p;
            }
        else
            for (int64_t i = l * n * k, e = (l + 1) * n * k; i < e; i++) {
                int r = (mask[i >> 3] >> (i & 7)) & 1;
                f += r; c += !r;
            }
    }
    for (int64_t t = 0; t < n; t++) {
        uint8_t *o = out + t * row;
        for (int64_t l = 0; l < L; l++) {
            int64_t i = (l * n + t) * k, cl = cur[2 * l], fl = cur[2 * l + 1];
            uint8_t *b = o + l * k;
#if defined(__BMI2__) && defined(__SSSE3__)
            if (k == 8 && t > 0 && cl + 8 <= nchanged && fl + 8 <= nrefs) {
                /* refs scattered into their slots with pdep, + slot index, & 7: a pshufb
                   index into the previous block; new ids scattered with pdep; blend. */
                int m = mask[i >> 3], p = __builtin_popcount(m);
                uint64_t keep = expand[m], src, rf, prev, v;
                memcpy(&src, changed + cl, 8);
                memcpy(&rf, refs + fl, 8);
                memcpy(&prev, b - row, 8);
                uint64_t idx = (_pdep_u64(rf, keep) + 0x0706050403020100ULL)
                               & 0x0707070707070707ULL;
                __m128i sh = _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)prev),
                                              _mm_cvtsi64_si128((long long)idx));
                v = ((uint64_t)_mm_cvtsi128_si64(sh) & keep) | _pdep_u64(src, ~keep);
                memcpy(b, &v, 8);
                cur[2 * l] = cl + 8 - p; cur[2 * l + 1] = fl + p;
                continue;
            }
#endif
            for (int64_t s = 0; s < k; s++, i++) {
                if ((mask[i >> 3] >> (i & 7)) & 1) {  /* never on the first row */
                    int64_t j = s + refs[fl++];
                    j -= (j >= k) ? k : 0;
                    b[s] = b[j - row];
                } else {
                    b[s] = changed[cl++];
                }
            }
            cur[2 * l] = cl; cur[2 * l + 1] = fl;
        }
    }
    free(cur);
}
"""
@functools.cache
def c_decoder() -> Any:
    """The compiled decoder of ``repeat-lm`` (built on first use with the system C compiler;
    ``None`` when there is none): what a format's reader kernel would cost, measured, not
    assumed."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    # Built in a temporary folder, removed once loaded (the mapping outlives the file).
    with tempfile.TemporaryDirectory(prefix="shard-layouts-") as d:
        src, so = f"{d}/repeat.c", f"{d}/repeat.so"
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        if subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", so, src],
                          capture_output=True).returncode != 0:
            return None
        lib = ctypes.CDLL(so)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.repeat_decode.argtypes = [ptr, ptr, i64, ptr, i64, i64, i64]
    lib.repeat_decode.restype = None
    lib.ref_decode.argtypes = [ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64]
    lib.ref_decode.restype = None
    return lib


class RepeatLM(Layout):
    name, doc = "repeat-lm", ("layer-major [layers, rows, k]; a bit per id for 'same as the "
                              "previous token's id of this layer and slot' + the ids that "
                              "change; decoded by a 12-line C kernel (NumPy where no compiler)")

    def applies(self, g):
        return g.id_dtype == np.uint8

    def encode(self, ids, g):
        lmk = _layer_major(ids)
        rep = np.zeros(lmk.shape, dtype=bool)
        np.equal(lmk[:, 1:], lmk[:, :-1], out=rep[:, 1:])
        return {"mask": np.packbits(rep.reshape(-1), bitorder="little"), "changed": lmk[~rep]}

    def decode(self, bufs, n, g):
        L, k = g.num_moe_layers, g.top_k
        lib = c_decoder()
        if lib is None:
            rep = np.unpackbits(bufs["mask"], count=L * n * k, bitorder="little"
                                ).view(bool).reshape(L, n, k)
            full = np.empty((L, n, k), dtype=np.uint8)
            keep = ~rep
            full[keep] = bufs["changed"]
            idx = np.where(keep, np.arange(n, dtype=np.int32)[None, :, None], 0)
            np.maximum.accumulate(idx, axis=1, out=idx)
            return _to_rows(np.take_along_axis(full, idx, axis=1))
        out = np.empty((n, L, k), dtype=np.uint8)
        mask, changed = bufs["mask"], bufs["changed"]
        lib.repeat_decode(mask.ctypes.data, changed.ctypes.data, changed.size, out.ctypes.data,
                          L, n, k)
        return out


class RefLM(Layout):
    name, doc = "ref-lm", ("layer-major; a bit per id for 'in the previous token's block "
                           "(any slot)', its slot as (slot - own slot) mod k (one byte each), "
                           "+ the ids that are new; decoded by a C kernel (NumPy fallback: slow)")

    def applies(self, g):
        return g.id_dtype == np.uint8

    def encode(self, ids, g):
        lmk = _layer_major(ids)
        L, n, k = lmk.shape
        hit = np.zeros((L, n, k, k), dtype=bool)  # [.., s, j]: id at s == previous id at j
        np.equal(lmk[:, 1:, :, None], lmk[:, :-1, None, :], out=hit[:, 1:])
        ref = hit.any(-1)
        j = hit.argmax(-1)
        d = (j - np.arange(k)) % k
        return {"mask": np.packbits(ref.reshape(-1), bitorder="little"),
                "refs": d[ref].astype(np.uint8), "changed": lmk[~ref]}

    def decode(self, bufs, n, g):
        L, k = g.num_moe_layers, g.top_k
        lib = c_decoder()
        if lib is None:  # row by row in NumPy: slow, for machines without a C compiler
            ref = np.unpackbits(bufs["mask"], count=L * n * k, bitorder="little"
                                ).view(bool).reshape(L, n, k)
            out = np.empty((L, n, k), dtype=np.uint8)
            out[~ref] = bufs["changed"]
            d = np.zeros((L, n, k), dtype=np.intp)
            d[ref] = bufs["refs"]
            src = (np.arange(k) + d) % k
            for t in range(1, n):
                r = ref[:, t]
                row = np.take_along_axis(out[:, t - 1], src[:, t], axis=1)
                out[:, t][r] = row[r]
            return _to_rows(out)
        out = np.empty((n, L, k), dtype=np.uint8)
        refs, changed = bufs["refs"], bufs["changed"]
        lib.ref_decode(bufs["mask"].ctypes.data, refs.ctypes.data, refs.size,
                       changed.ctypes.data, changed.size, out.ctypes.data, L, n, k)
        return out


LAYOUTS: dict[str, Layout] = {c.name: c() for c in (
    Flat, LayerMajor, LayerSlotMajor, PerLayer, SortedPerm, SortedDeltaPerm, BitmapPerm,
    Packed7, BitShuffle, Repeat0, RepeatMask, RepeatLM, RefLM)}

# (layout, codec, level)
DEFAULT_VARIANTS: tuple[tuple[str, str, int | None], ...] = (
    ("flat", "none", None), ("flat", "lz4", None),
    ("flat", "zstd", 1), ("flat", "zstd", 3), ("flat", "zstd", 9), ("flat", "zstd", 19),
    ("layer-major", "lz4", None),
    ("layer-major", "zstd", 1), ("layer-major", "zstd", 3), ("layer-major", "zstd", 9),
    ("layer-major", "zstd", 19),
    ("layer-slot-major", "zstd", 1), ("layer-slot-major", "zstd", 3),
    ("per-layer", "zstd", 1), ("per-layer", "zstd", 3),
    ("sorted+perm", "zstd", 3), ("sorted-delta+perm", "zstd", 3),
    ("bitmap+perm", "zstd", 3),
    ("packed7", "none", None), ("packed7", "zstd", 3),
    ("bitshuffle", "zstd", 3),
    ("repeat0", "zstd", 1), ("repeat0", "zstd", 3), ("repeat0", "zstd", 9),
    ("repeat-mask", "zstd", 1), ("repeat-mask", "zstd", 3),
    ("repeat-lm", "lz4", None), ("repeat-lm", "zstd", 1), ("repeat-lm", "zstd", 3),
    ("repeat-lm", "zstd", 9),
    ("ref-lm", "zstd", 1), ("ref-lm", "zstd", 3),
)


def _label(layout: str, codec: str, level: int | None) -> str:
    return f"{layout}/{codec}" + ("" if level is None else f"-{level}")


# ---------------------------------------------------------------------------------------------
# Arrow IPC round trip


def _batch(bufs: dict[str, np.ndarray]) -> pa.RecordBatch:
    cols = [pa.ListArray.from_arrays(pa.array([0, b.size], pa.int32()), pa.array(b))
            for b in bufs.values()]
    return pa.RecordBatch.from_arrays(cols, names=list(bufs))


def encode(routing: np.ndarray, g: RoutingGeometry, layout: str, codec: str,
           level: int | None, rows_per_batch: int) -> bytes:
    """``routing`` in one layout, as an Arrow IPC file (record batches of ``rows_per_batch``)."""
    lay = LAYOUTS[layout]
    options = pa.ipc.IpcWriteOptions(
        compression=None if codec == "none" else pa.Codec(codec, level))
    sink = io.BytesIO()
    writer = None
    for lo in range(0, routing.shape[0], rows_per_batch):
        rb = _batch(lay.encode(routing[lo : lo + rows_per_batch], g))
        if writer is None:
            writer = pa.ipc.new_file(sink, rb.schema, options=options)
        writer.write_batch(rb)
    assert writer is not None
    writer.close()
    return sink.getvalue()


def decode(data: bytes | pa.Buffer, g: RoutingGeometry, layout: str, rows: list[int],
           use_threads: bool = True) -> list[np.ndarray]:
    """Every record batch back to a ``[rows, layers, k]`` array in engine order."""
    lay = LAYOUTS[layout]
    reader = pa.ipc.open_file(pa.BufferReader(data),
                              options=pa.ipc.IpcReadOptions(use_threads=use_threads))
    out = []
    for i in range(reader.num_record_batches):
        rb = reader.get_batch(i)
        bufs = {name: col.values.to_numpy(zero_copy_only=True)
                for name, col in zip(rb.schema.names, rb.columns)}
        out.append(lay.decode(bufs, rows[i], g))
    return out


# ---------------------------------------------------------------------------------------------
# data


def uniform_routing(g: RoutingGeometry, rows: int, seed: int = 0) -> np.ndarray:
    """The worst case: k distinct ids per block, uniform over the experts, in random order."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, g.num_moe_layers, g.top_k), dtype=g.id_dtype)
    flat = out.reshape(-1, g.top_k)
    step = 1 << 16
    for lo in range(0, flat.shape[0], step):
        m = min(step, flat.shape[0] - lo)
        keys = rng.random((m, g.num_experts), dtype=np.float32)
        flat[lo : lo + m] = np.argpartition(keys, g.top_k, axis=1)[:, : g.top_k]
        rng.permuted(flat[lo : lo + m], axis=1, out=flat[lo : lo + m])
    return out


def routing_stats(r: np.ndarray, g: RoutingGeometry) -> dict[str, float]:
    """What the data holds: skew, neighbour correlation and empirical entropies (bits/id)."""
    L, k, e = g.num_moe_layers, g.top_k, g.num_experts
    sample = r[: min(r.shape[0], 50_000)]
    load = np.stack([np.bincount(sample[:, i].ravel(), minlength=e) for i in range(L)])
    p = load / load.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_layer = float(np.nansum(-p * np.log2(p), axis=1).mean())
    allp = load.sum(0) / load.sum()
    h_mix = float(np.nansum(-allp * np.log2(np.where(allp > 0, allp, 1))))
    a, b = sample[:-1], sample[1:]
    same_slot = float((a == b).mean())
    shared = float((a[..., :, None] == b[..., None, :]).any(-1).sum(-1).mean())
    return {
        "load_max_over_mean_per_layer": round(float((load.max(1) / load.mean(1)).mean()), 2),
        "entropy_bits_per_id_per_layer": round(h_layer, 3),
        "entropy_bits_per_id_all_layers_mixed": round(h_mix, 3),
        "uniform_bits_per_id": round(math.log2(e), 3),
        "uniform_set_and_order_bits_per_id": round(
            (math.lgamma(e + 1) - math.lgamma(e - k + 1)) / math.log(2) / k, 3),
        "same_slot_as_previous_token": round(same_slot, 4),
        "experts_shared_with_previous_token": round(shared, 3),
    }


# ---------------------------------------------------------------------------------------------
# the study


def _median(v: list[float]) -> float:
    return statistics.median(v)


def study(g: RoutingGeometry, routing: np.ndarray,
          variants: tuple[tuple[str, str, int | None], ...], repeats: int,
          batch_bytes: int = BATCH_BYTES, slow_level: int = 19, write_rounds: int = 3
          ) -> list[dict[str, Any]]:
    """Encode/decode ``routing`` with each variant over interleaved rounds."""
    rows = routing.shape[0]
    raw = routing.nbytes
    per_row = routing[0].nbytes
    rpb = max(1, batch_bytes // per_row)
    batch_rows = [min(rpb, rows - lo) for lo in range(0, rows, rpb)]
    int32 = g.ids_per_token * 4
    wire_int32 = g.wire_ids_per_token * 4
    vs = [v for v in variants if LAYOUTS[v[0]].applies(g)]
    data: dict[tuple, bytes] = {}
    t: dict[tuple, dict[str, list[float]]] = {v: {"write": [], "read": [], "read1": []}
                                             for v in vs}
    exact: dict[tuple, bool] = {}
    for rnd in range(repeats):
        for v in vs:
            layout, codec, level = v
            if rnd == 0 or (rnd < write_rounds and (level or 0) < slow_level):
                t0 = time.perf_counter()
                data[v] = encode(routing, g, layout, codec, level, rpb)
                t[v]["write"].append(time.perf_counter() - t0)
            buf = pa.py_buffer(data[v])
            for key, threads in (("read", True), ("read1", False)):
                t0 = time.perf_counter()
                out = decode(buf, g, layout, batch_rows, use_threads=threads)
                t[v][key].append(time.perf_counter() - t0)
            if rnd == 0:
                exact[v] = bool(np.array_equal(np.concatenate(out), routing))
            del out
    results = []
    for v in vs:
        layout, codec, level = v
        size = len(data[v])
        results.append({
            "variant": _label(*v),
            "layout": layout,
            "codec": codec,
            "level": level,
            "bytes": size,
            "bytes_per_token": round(size / rows, 2),
            "ratio_to_int32": round(size / rows / int32, 4),
            "ratio_to_wire_int32": round(size / rows / wire_int32, 4),
            "bits_per_id": round(size * 8 / routing.size, 3),
            "write_mb_s": round(raw / _median(t[v]["write"]) / 1e6, 1),
            "read_gb_s": round(raw / _median(t[v]["read"]) / 1e9, 3),
            "read_1thread_gb_s": round(raw / _median(t[v]["read1"]) / 1e9, 3),
            "write_rounds": len(t[v]["write"]),
            "engine_order_kept": LAYOUTS[layout].engine_order,
            "decodes_exactly": exact[v],
        })
    return results


def _synthetic_routing(g: RoutingGeometry, ds: str, tokens: int, zipf_s: float,
                       stickiness: float, seed: int) -> np.ndarray:
    if ds in ("realistic", "reordered"):
        r = RoutingModel(g, zipf_s=zipf_s, stickiness=stickiness, seed=seed).routing(tokens)
        if ds == "reordered":  # the same sets, each block in a random order
            flat = r.reshape(-1, g.top_k)
            np.random.default_rng(seed + 1).permuted(flat, axis=1, out=flat)
        return r
    if ds == "uniform":
        return uniform_routing(g, tokens, seed)
    raise ValueError(f"unknown data set {ds!r} (realistic | reordered | uniform)")


def _stored_routing(dataset: str, tokens: int) -> tuple[RoutingGeometry, np.ndarray]:
    """The first ``tokens`` routing rows of a stored dataset, in storage order."""
    from ..shards import ShardReader

    reader = ShardReader(dataset, verify=False)
    parts, have = [], 0
    for sample in reader:
        parts.append(sample.routed)
        have += sample.routed.shape[0]
        if have >= tokens:
            break
    if not parts:
        raise ValueError(f"{dataset}: no stored samples")
    return reader.geometry, np.ascontiguousarray(np.concatenate(parts)[:tokens])


def run(tokens: int = 50_000, models: tuple[str, ...] = ("qwen3-30b-a3b", "deepseek-v3"),
        datasets: tuple[str, ...] = ("realistic", "uniform"), repeats: int = 5,
        variants: tuple[tuple[str, str, int | None], ...] = DEFAULT_VARIANTS,
        batch_bytes: int = BATCH_BYTES, zipf_s: float = 0.5, stickiness: float = 0.3,
        seed: int = 0, slow_level: int = 19, dataset: str | None = None,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The study over each geometry and data set; one JSON-ready dict. ``dataset``: a stored
    dataset (path or URI) whose routing (its first ``tokens`` rows, storage order) is studied
    instead of synthetic data (``models`` and ``datasets`` are then ignored): real engine
    routing is what should decide the next format."""
    out: dict[str, Any] = {
        "benchmark": "shard-layouts",
        "tokens": tokens,
        "settings": {
            "repeats": repeats, "batch_bytes": batch_bytes,
            "rows_note": "routing only (no tokens / log-probs: format 3 adds ~8 B/token)",
            "io": "Arrow IPC file format in memory (like a shard in the page cache); each "
                  "buffer one list<uint> column of one row, compressed by Arrow per buffer",
            "timing": "median over interleaved rounds (each round: every variant writes, then "
                      "reads threaded and single-threaded); writes timed in the first "
                      f"{min(3, repeats)} rounds, zstd level >= {slow_level} in the first only",
            "read": "every record batch decoded to a [rows, layers, k] ndarray in engine "
                    "order; GB/s of those arrays",
        },
        "routing_model": {"zipf_s": zipf_s, "stickiness": stickiness, "how": (
            "per layer, expert popularity Zipf(s) over a random permutation of the experts; "
            "each (token, layer, slot) keeps the previous token's id with p = stickiness, else "
            "draws by popularity; repeats within a block redrawn; draw order kept. "
            "'reordered': the same routing with every block's k ids in a random order (the "
            "sets and their neighbour overlap kept, the slot alignment of repeats lost)")},
        "layouts": {name: lay.doc for name, lay in LAYOUTS.items()},
        "results": [],
        "data": [],
    }
    jobs = [(m, ds) for m in models for ds in datasets] if dataset is None else [("", "")]
    for model, ds in jobs:
        if dataset is not None:
            g, r = _stored_routing(dataset, tokens)
            model, ds = g.name or "dataset", "stored"
        else:
            g = RoutingGeometry.resolve(model)
            r = _synthetic_routing(g, ds, tokens, zipf_s, stickiness, seed)
        if progress:
            progress(f"{model} {ds}")
        out["data"].append({"model": model, "data": ds, "geometry": g.to_dict(),
                            "int32_bytes_per_token": g.ids_per_token * 4,
                            "wire_int32_bytes_per_token": g.wire_ids_per_token * 4,
                            **routing_stats(r, g)})
        for res in study(g, r, variants, repeats, batch_bytes, slow_level):
            out["results"].append({"model": model, "data": ds, **res})
    target = 0.20
    out["target"] = {"ratio_to_int32_max": target, "read_gb_s_min": 1.0,
                     "met_by": [f"{x['model']} {x['data']} {x['variant']}"
                                for x in out["results"]
                                if x["ratio_to_int32"] <= target and x["read_gb_s"] >= 1.0]}
    return out
