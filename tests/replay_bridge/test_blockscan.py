"""The compiled block scan against a plain reference: every id width, narrow width, block
size, row stride, and ids that are negative, out of range or repeated anywhere."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge._blockscan import scan
from replay_bridge.checks import accept
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample

SRC = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def _reference(src: np.ndarray, narrow: np.dtype | None) -> tuple[int, bool, np.ndarray]:
    unsigned = src.view(np.dtype(f"u{src.dtype.itemsize}"))
    out = src if narrow is None else unsigned.astype(narrow)  # read unsigned, truncated
    top = int(unsigned.max()) if src.size else 0
    if src.shape[-1] < 2 or not src.size:
        return top, False, out
    s = np.sort(out.reshape(-1, src.shape[-1]), axis=1)
    return top, bool((s[:, 1:] == s[:, :-1]).any()), out


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(SRC), narrow=st.sampled_from([np.uint8, np.uint16, None]),
       rows=st.integers(0, 9), blocks=st.integers(1, 7), k=st.integers(1, 10),
       extra_layers=st.integers(0, 2), high=st.sampled_from([4, 64, 256, 300, 70000]),
       seed=st.integers(0, 2**32 - 1), distinct=st.booleans())
def test_scan_matches_the_reference(dtype, narrow, rows, blocks, k, extra_layers, high, seed,
                                    distinct):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    layers = blocks + extra_layers
    if distinct and k <= high:  # distinct ids per block, then maybe one repeat planted
        ids = np.argsort(rng.random((rows, layers, max(high, k))), axis=-1)[..., :k]
    else:
        ids = rng.integers(0, high, size=(rows, layers, k))
    if rows and distinct and rng.random() < 0.5 and k > 1:
        r, b, i, j = rng.integers(rows), rng.integers(layers), *rng.choice(k, 2, replace=False)
        ids[r, b, i] = ids[r, b, j]
    if info.min < 0 and rows and rng.random() < 0.3:
        ids[rng.integers(rows), rng.integers(layers), rng.integers(k)] = -1 - rng.integers(5)
    wire = ids.astype(dtype)
    src = wire[:, extra_layers:, :]  # rows at a stride longer than their ids
    if narrow is None:
        src = np.ascontiguousarray(src)
        out = None
    else:
        out = np.full(src.shape, 0xAB, narrow)
    top, repeats = scan(src, out)
    want_top, want_repeats, want_out = _reference(src, narrow)
    assert top == want_top
    assert repeats == want_repeats
    if out is not None:
        np.testing.assert_array_equal(out, want_out)


def test_scan_of_empty_shapes():
    for shape in [(0, 3, 8), (3, 0, 8), (3, 2, 0), (0, 0, 0)]:
        ids = np.zeros(shape, np.int32)
        assert scan(ids, np.zeros(shape, np.uint8)) == (0, False)
        assert scan(ids, None) == (0, False)


def test_scan_refuses_what_it_cannot_read():
    ids = np.zeros((2, 3, 4), np.int32)
    with pytest.raises(ValueError, match="contiguous"):
        scan(ids.transpose(0, 2, 1), None)
    with pytest.raises(TypeError, match="3-D"):
        scan(ids.reshape(6, 4), None)
    with pytest.raises(TypeError, match="3-D"):
        scan(ids.astype(np.float32), None)
    with pytest.raises(TypeError, match="3-D"):
        scan(ids.astype(">i4"), None)
    with pytest.raises(ValueError, match="out"):
        scan(ids, np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="out"):
        scan(ids, np.zeros((2, 3, 4), np.int32))
    with pytest.raises(BufferError, match="not writable"):
        scan(ids, np.zeros((2, 3, 4), np.uint8).data.toreadonly())


def test_checks_take_either_path_to_the_same_verdicts(rng, monkeypatch):
    """Wire routing in a layout the compiled scan does not take (a transposed array) goes
    the NumPy way; big-endian ids are read as numbers, not as swapped bytes; every way gives
    the same report and stored ids."""
    from replay_bridge import checks

    g = RoutingGeometry(6, (1, 2, 3, 4, 5), 8, 128)
    ids = np.argsort(rng.random((40, 6, 128)), axis=-1)[..., :8].astype(np.int32)
    ids[7, 3, 5] = ids[7, 3, 1]
    ids[20, 1, 0] = 500
    tokens = np.arange(41, dtype=np.int32)
    results = []
    for wire in (ids, ids.astype(">i4"), np.asfortranarray(ids)):
        for compiled in (checks._compiled_scan, None):
            monkeypatch.setattr(checks, "_compiled_scan", compiled)
            report, _ = accept(WireSample("s", tokens, 10, routing=wire), g)
            results.append((report.kinds, report.first, {k: v.tolist() for k, v in
                                                         report.bad.items()}))
            good = ids.copy()
            good[7, 3, 5], good[20, 1, 0] = 127, 0
            good[7, 3] = np.arange(8) + 100
            report, routed = accept(WireSample("s", tokens, 10, routing=good), g)
            assert report.ok
            np.testing.assert_array_equal(routed.routed, good[:, 1:, :])
    assert all(r == results[0] for r in results)
    assert results[0][0] == ("out_of_range", "duplicate_ids")
