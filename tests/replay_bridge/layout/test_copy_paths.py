"""The layout's slice-copy fast path against its general row gather and against the code it
replaced (``bench layout``'s ``layout_before``): the same ids, regions and offsets in every
case, and the same refusals."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge.benchmarks.layout import layout_before
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import LayoutError, Packing, RankSlice, _layout, layout_routing
from replay_bridge.sample import RoutedSample

GEO = RoutingGeometry(6, (1, 2, 4, 5), 4, 16)  # dense layers 0 and 3
WIDE = RoutingGeometry(3, (0, 1, 2), 3, 300)  # uint16 ids


def _samples(data, geo: RoutingGeometry, lengths: list[int]) -> list[RoutedSample]:
    out = []
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for i, n in enumerate(lengths):
        start = data.draw(st.integers(0, n - 2))
        rows = n - 1 - start
        keys = rng.random((rows, geo.num_moe_layers, geo.num_experts))
        routed = np.argsort(keys, axis=-1)[..., : geo.top_k].astype(geo.id_dtype)
        s = RoutedSample(sample_id=f"s{i}", tokens=np.zeros(n, np.int32),
                         prompt_len=data.draw(st.integers(start, n - 1)), routed_start=start,
                         routed=routed)
        if data.draw(st.booleans()):
            s.native = rng.random(rows) < 0.3
            s.routed[s.native] = 0  # as accept stores them; never read
        out.append(s)
    return out


def _layer_sets(geo: RoutingGeometry):
    m = geo.moe_layers
    return st.sampled_from([None, m[1:3], m[2:], (m[0], m[2]), (m[3], m[0])] if len(m) == 4
                           else [None, m[1:], (m[2], m[0])])


def _ranks(cp: int, tp: int, sp: bool) -> list[RankSlice]:
    return [RankSlice(tp_size=tp, tp_rank=t, sequence_parallel=sp, cp_size=cp, cp_rank=c)
            for c in range(cp) for t in range(tp if sp else 1)]


def _packing(fmt: str, lengths: list[int], cp: int, tp: int, sp: bool, total: int) -> Packing:
    m = 2 * cp * (tp if sp else 1)
    if fmt == "bshd":
        return Packing.bshd(-(-max(lengths) // m) * m + m * total)
    return Packing.thd(m, pad_total_multiple=m * max(total, 1))


def _layouts(samples, geo, packing, rank, layers, validate=True):
    return [_layout(samples, geo, packing, rank, layers, None, validate, fast=True),
            _layout(samples, geo, packing, rank, layers, None, validate, fast=False),
            layout_before(samples, geo, packing, rank, layers, validate=validate)]


def _outcome(samples, geo, packing, rank, layers, path):
    """Path 0: the fast path (``layout_routing``); 1: the general row gather; 2: before."""
    try:
        if path == 0:
            h = layout_routing(samples, geo, packing, rank, layers)
        elif path == 1:
            h = _layout(samples, geo, packing, rank, layers, None, True, fast=False)
        else:
            h = layout_before(samples, geo, packing, rank, layers)
        return ("ok", h.ids.tobytes(), h.region.tobytes())
    except LayoutError as e:
        return ("refused", str(e))


case = dict(
    lengths=st.lists(st.integers(2, 24), min_size=1, max_size=5),
    fmt=st.sampled_from(["bshd", "thd"]),
    tp=st.sampled_from([1, 2]),
    cp=st.sampled_from([1, 2]),
    sp=st.booleans(),
    extra=st.sampled_from([0, 1, 3]),
    geo=st.sampled_from([GEO, WIDE]),
    data=st.data(),
)


@settings(max_examples=120, deadline=None)
@given(**case)
def test_fast_path_general_path_and_before_agree(lengths, fmt, tp, cp, sp, extra, geo, data):
    samples = _samples(data, geo, lengths)
    layers = data.draw(_layer_sets(geo))
    packing = _packing(fmt, lengths, cp, tp, sp, extra)
    for rank in _ranks(cp, tp, sp):
        for validate in (True, False):
            fast, general, before = _layouts(samples, geo, packing, rank, layers, validate)
            for other in (general, before):
                np.testing.assert_array_equal(fast.ids, other.ids)
                assert fast.ids.dtype == other.ids.dtype == geo.id_dtype
                np.testing.assert_array_equal(fast.region, other.region)
                np.testing.assert_array_equal(fast.cu_seqlens_padded, other.cu_seqlens_padded)
                assert fast.layers == other.layers and fast.sample_ids == other.sample_ids


@settings(max_examples=120, deadline=None)
@given(kind=st.sampled_from(["out_of_range", "repeat"]), **case)
def test_every_path_refuses_a_bad_id_with_the_same_message(kind, lengths, fmt, tp, cp, sp,
                                                           extra, geo, data):
    samples = _samples(data, geo, lengths)
    layers = data.draw(_layer_sets(geo))
    packing = _packing(fmt, lengths, cp, tp, sp, extra)
    with_rows = [s for s in samples if s.rows]
    if not with_rows:
        return
    s = data.draw(st.sampled_from(with_rows))
    row = data.draw(st.integers(0, s.rows - 1))
    slot = data.draw(st.integers(0, geo.num_moe_layers - 1))
    if kind == "out_of_range":
        if np.iinfo(geo.id_dtype).max < geo.num_experts:
            return
        s.routed[row, slot, -1] = geo.num_experts
    else:
        s.routed[row, slot, -1] = s.routed[row, slot, 0]
    read = (s.native is None or not s.native[row])
    read = read and (layers is None or geo.moe_layers[slot] in layers)
    refused = 0
    for rank in _ranks(cp, tp, sp):
        outcomes = [_outcome(samples, geo, packing, rank, layers, p) for p in range(3)]
        assert outcomes[0] == outcomes[1] == outcomes[2]
        if outcomes[0][0] == "refused":
            refused += 1
            msg = outcomes[0][1]
            assert f"sample {s.sample_id!r}, token position {s.routed_start + row}, layer " \
                   f"{geo.moe_layers[slot]}" in msg
            assert ("outside" if kind == "out_of_range" else "repeated expert id") in msg
        # validate=False lays out what is stored, on every path
        fast, general, _ = _layouts(samples, geo, packing, rank, layers, validate=False)
        np.testing.assert_array_equal(fast.ids, general.ids)
    # the row lands on exactly one rank; it is refused there unless it is never read
    assert refused == (1 if read else 0)


def test_fast_path_is_taken_for_thd_and_plain_bshd(monkeypatch):
    """The slice copies run (the row gather is not called) where the token order allows."""
    import replay_bridge.layout as layout

    calls = []
    real = layout._gather_rows
    monkeypatch.setattr(layout, "_gather_rows", lambda *a: calls.append(1) or real(*a))
    samples = [RoutedSample(sample_id=f"s{i}", tokens=np.zeros(9, np.int32), prompt_len=3,
                            routed=np.tile(np.arange(4, dtype=np.uint8), (8, 4, 1)))
               for i in range(2)]
    layout_routing(samples, GEO, Packing.thd(4), RankSlice(cp_size=2, tp_size=2,
                                                          sequence_parallel=True))
    layout_routing(samples, GEO, Packing.bshd(12))
    assert calls == []
    layout_routing(samples, GEO, Packing.bshd(12), RankSlice(cp_size=2))
    assert calls == [1]


def test_pad_rows_from_one_period_equal_pad_ids():
    from replay_bridge.layout import _pad_rows, pad_ids

    g = np.array([0, 5, 17, 1000, 3, 64, 65])
    for k, e in ((4, 16), (8, 128), (6, 160), (3, 300), (8, 256)):
        want = pad_ids(g, (1, 2, 7), k, e, np.dtype(np.uint16))
        got = _pad_rows(g, (1, 2, 7), k, e, np.dtype(np.uint16))
        np.testing.assert_array_equal(got, want)
        many = np.arange(3000)
        np.testing.assert_array_equal(_pad_rows(many, (0, 9), k, e, np.dtype(np.uint16)),
                                      pad_ids(many, (0, 9), k, e, np.dtype(np.uint16)))
