"""Micro-batch layout (``replay_bridge.layout``, pure NumPy): token order, slicing, padding,
region codes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import (
    COMPLETION,
    NATIVE,
    PAD,
    PROMPT,
    LayoutError,
    Packing,
    RankSlice,
    layout_routing,
    pad_ids,
)
from replay_bridge.sample import RoutedSample

GEO = RoutingGeometry(6, (1, 2, 4, 5), 4, 16)  # dense layers 0 and 3


def sample(i: int, n: int, prompt_len: int, start: int = 0, seed: int = 0) -> RoutedSample:
    """Ids encode (sample, position, layer), so a misplaced row shows: the k ids of a block
    are k consecutive experts starting at ``(i*7 + pos*3 + layer) * k`` (mod experts)."""
    pos = np.arange(start, n - 1)[:, None, None]
    lay = np.arange(GEO.num_moe_layers)[None, :, None]
    j = np.arange(GEO.top_k)[None, None, :]
    routed = ((i * 7 + pos * 3 + lay) * GEO.top_k + j) % GEO.num_experts
    return RoutedSample(sample_id=f"s{i}", tokens=np.zeros(n, np.int32), prompt_len=prompt_len,
                        routed_start=start, routed=routed.astype(np.uint8))


def expected_row(s: RoutedSample, pos: int) -> np.ndarray:
    return s.routed[pos - s.routed_start]


def test_bshd_is_sequence_major_with_pad_rows_for_last_token_and_padding():
    a, b = sample(0, 4, 2), sample(1, 3, 1)
    h = layout_routing([a, b], GEO, Packing.bshd(5))
    assert h.ids.shape == (10, 4, 4) and h.ids.dtype == np.uint8
    # row s * b + b_idx
    np.testing.assert_array_equal(h.ids[0], expected_row(a, 0))
    np.testing.assert_array_equal(h.ids[1], expected_row(b, 0))
    np.testing.assert_array_equal(h.ids[2 * 2 + 0], expected_row(a, 2))
    np.testing.assert_array_equal(h.ids[1 * 2 + 1], expected_row(b, 1))
    assert h.region.tolist() == [PROMPT, PROMPT, PROMPT, COMPLETION, COMPLETION, PAD,
                                 PAD, PAD, PAD, PAD]


def test_thd_concatenates_padded_sequences_and_respects_routed_start():
    a, b = sample(0, 5, 3, start=2), sample(1, 3, 1)
    h = layout_routing([a, b], GEO, Packing.thd(4))
    assert h.cu_seqlens_padded.tolist() == [0, 8, 12]
    assert h.region[:8].tolist() == [NATIVE, NATIVE, PROMPT, COMPLETION, PAD, PAD, PAD, PAD]
    np.testing.assert_array_equal(h.ids[3], expected_row(a, 3))
    np.testing.assert_array_equal(h.ids[8], expected_row(b, 0))
    assert h.region[8:].tolist() == [PROMPT, COMPLETION, PAD, PAD]


def test_context_parallel_zigzag_per_sequence():
    a, b = sample(0, 8, 4), sample(1, 4, 2)
    full = layout_routing([a, b], GEO, Packing.thd(4))
    r0 = layout_routing([a, b], GEO, Packing.thd(4), RankSlice(cp_size=2, cp_rank=0))
    r1 = layout_routing([a, b], GEO, Packing.thd(4), RankSlice(cp_size=2, cp_rank=1))
    # sequence a (8 slots): chunks of 2; rank 0 holds chunks 0, 3; rank 1 chunks 1, 2
    np.testing.assert_array_equal(r0.ids[:4], full.ids[[0, 1, 6, 7]])
    np.testing.assert_array_equal(r1.ids[:4], full.ids[[2, 3, 4, 5]])
    # sequence b (4 slots): chunks of 1
    np.testing.assert_array_equal(r0.ids[4:], full.ids[[8, 11]])
    np.testing.assert_array_equal(r1.ids[4:], full.ids[[9, 10]])


def test_context_parallel_matches_megatron_bshd_cut():
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from unittest import mock

    from megatron.core.utils import get_batch_on_this_cp_rank

    samples = [sample(i, 8, 3, seed=i) for i in range(3)]
    full = layout_routing(samples, GEO, Packing.bshd(8))
    gid = torch.arange(3 * 8).reshape(3, 8)
    for r in range(2):
        with mock.patch("megatron.core.utils.parallel_state") as ps:
            ps.get_context_parallel_world_size.return_value = 2
            ps.get_context_parallel_rank.return_value = r
            cut = get_batch_on_this_cp_rank({"g": gid})["g"]  # [b, s_local]
        order = cut.T.reshape(-1).numpy()  # sequence-major
        # full.ids is sequence-major over [8, 3]: global (b, s) -> row s * 3 + b
        rows = (order % 8) * 3 + order // 8
        h = layout_routing(samples, GEO, Packing.bshd(8), RankSlice(cp_size=2, cp_rank=r))
        np.testing.assert_array_equal(h.ids, full.ids[rows])


def test_sequence_parallel_takes_contiguous_slices_after_cp():
    samples = [sample(i, 6, 2) for i in range(2)]
    full = layout_routing(samples, GEO, Packing.thd(2))
    parts = [layout_routing(samples, GEO, Packing.thd(2),
                            RankSlice(tp_size=3, tp_rank=r, sequence_parallel=True))
             for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), full.ids)
    no_sp = layout_routing(samples, GEO, Packing.thd(2), RankSlice(tp_size=3, tp_rank=1))
    np.testing.assert_array_equal(no_sp.ids, full.ids)
    with pytest.raises(LayoutError, match="sequence parallel 5 needs the local token count"):
        layout_routing(samples, GEO, Packing.thd(2),
                       RankSlice(tp_size=5, tp_rank=0, sequence_parallel=True))


def test_local_layers_only_and_dense_layers_refused():
    s = sample(0, 5, 2)
    h = layout_routing([s], GEO, Packing.thd(1), layers=(4, 5))
    np.testing.assert_array_equal(h.ids[1], s.routed[1, 2:4])
    with pytest.raises(LayoutError, match=r"layers \[3\] are not MoE layers"):
        layout_routing([s], GEO, Packing.thd(1), layers=(3,))


def test_pad_rows_are_distinct_and_spread_over_every_expert():
    ids = pad_ids(np.arange(64), (1, 2), 4, 16, np.dtype(np.uint8))
    srt = np.sort(ids, -1)
    assert (srt[..., 1:] != srt[..., :-1]).all()
    counts = np.bincount(ids[:, 0].ravel(), minlength=16)
    assert counts.min() == counts.max() == 64 * 4 // 16


def test_layout_errors_name_the_sample():
    with pytest.raises(LayoutError, match="sample 's0' has 9 tokens, more than the bshd seq_length 8"):
        layout_routing([sample(0, 9, 2)], GEO, Packing.bshd(8))
    with pytest.raises(LayoutError, match="context parallel 2 needs every padded sequence length divisible by 4; sample 's0' is padded to 6"):
        layout_routing([sample(0, 6, 2)], GEO, Packing.thd(2), RankSlice(cp_size=2))
    with pytest.raises(LayoutError, match="needs at least one sample"):
        layout_routing([], GEO, Packing.thd())
    bad = sample(0, 5, 2)
    bad.routed = bad.routed[:, :3]
    with pytest.raises(LayoutError, match=r"routing shape \(4, 3, 4\) does not match"):
        layout_routing([bad], GEO, Packing.thd())


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 20), min_size=1, max_size=4),
    fmt=st.sampled_from(["bshd", "thd"]),
    tp=st.sampled_from([1, 2]),
    cp=st.sampled_from([1, 2]),
    sp=st.booleans(),
    data=st.data(),
)
def test_every_rollout_row_lands_on_exactly_one_rank_at_its_position(lengths, fmt, tp, cp, sp, data):
    samples = [sample(i, n, data.draw(st.integers(1, n - 1)),
                      start=data.draw(st.integers(0, n - 2)))
               for i, n in enumerate(lengths)]
    m = 2 * cp * (tp if sp else 1)
    seq_len = -(-max(lengths) // m) * m
    packing = Packing.bshd(seq_len) if fmt == "bshd" else Packing.thd(m)
    seen = []
    for c in range(cp):
        for t in range(tp if sp else 1):
            h = layout_routing(samples, GEO, packing,
                               RankSlice(tp_size=tp, tp_rank=t, sequence_parallel=sp,
                                         cp_size=cp, cp_rank=c))
            data_rows = h.ids[h.region < PAD]
            seen.append(data_rows.reshape(-1, GEO.ids_per_token))
            pads = np.sort(h.ids[h.region >= PAD], -1)
            assert (pads[..., 1:] != pads[..., :-1]).all()
    got = np.concatenate(seen)
    want = np.concatenate([s.routed for s in samples]).reshape(-1, GEO.ids_per_token)
    # Every stored row appears exactly once across ranks (rows are unique by construction
    # only up to the modulus, so compare as multisets).
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))


def test_pack_lengths_put_the_pack_padding_on_the_last_sequence():
    p = Packing.thd(pad_multiple=4, pad_total_multiple=16)
    assert p.pack_lengths(np.array([5, 3, 9])).tolist() == [8, 4, 20]
    assert Packing.thd(2).pack_lengths(np.array([5, 3])).tolist() == [6, 4]
    assert Packing.bshd(12).pack_lengths(np.array([5, 3])).tolist() == [12, 12]
    a, b = sample(0, 5, 2), sample(1, 3, 1)
    h = layout_routing([a, b], GEO, p)
    assert h.cu_seqlens_padded.tolist() == [0, 8, 16] and h.num_tokens == 16


def test_rows_before_routed_start_and_marked_rows_are_native_with_pad_ids():
    a, b = sample(0, 7, 4, start=2), sample(1, 5, 2)
    b.native = np.array([False, True, False, True])  # positions 1 and 3 of b
    h = layout_routing([a, b], GEO, Packing.thd(4))
    assert h.cu_seqlens_padded.tolist() == [0, 8, 16]
    assert h.region.tolist() == [NATIVE, NATIVE, PROMPT, PROMPT, COMPLETION, COMPLETION, PAD, PAD,
                                 PROMPT, NATIVE, COMPLETION, NATIVE, PAD, PAD, PAD, PAD]
    assert h.has_native and h.native.tolist() == (h.region == NATIVE).tolist()
    rows = np.flatnonzero(h.region >= PAD)
    np.testing.assert_array_equal(h.ids[rows], pad_ids(rows, GEO.moe_layers, 4, 16, np.uint8))
    np.testing.assert_array_equal(h.ids[10], expected_row(b, 2))
    plain = layout_routing([sample(0, 7, 4)], GEO, Packing.thd(4))
    assert not plain.has_native and NATIVE not in plain.region


def test_stored_ids_of_native_rows_are_never_read():
    s = sample(0, 6, 2)
    s.routed[1] = 0  # all-zero (repeated ids) and out of range: ignored where marked native
    s.routed[3, 0, 0] = 200
    s.native = np.array([False, True, False, True, False])
    h = layout_routing([s], GEO, Packing.thd(1))
    assert h.region.tolist() == [PROMPT, NATIVE, COMPLETION, NATIVE, COMPLETION, PAD]
    s.native = np.array([False, True, False, False, False])
    with pytest.raises(LayoutError, match="token position 3, layer 1: an expert id outside"):
        layout_routing([s], GEO, Packing.thd(1))
    s.native = np.array([True, False])
    with pytest.raises(LayoutError, match=r"native marks of shape \(2,\) for 5 routing rows"):
        layout_routing([s], GEO, Packing.thd(1))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 20), min_size=1, max_size=4),
    fmt=st.sampled_from(["bshd", "thd"]),
    tp=st.sampled_from([1, 2]),
    cp=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_native_rows_land_once_across_ranks_and_the_rest_stays_exact(lengths, fmt, tp, cp, data):
    samples = []
    for i, n in enumerate(lengths):
        s = sample(i, n, data.draw(st.integers(1, n - 1)), start=data.draw(st.integers(0, n - 2)))
        if data.draw(st.booleans()):
            s.native = np.asarray(data.draw(st.lists(st.booleans(), min_size=s.rows,
                                                     max_size=s.rows)), dtype=bool)
        samples.append(s)
    m = 2 * cp * tp
    seq_len = -(-max(lengths) // m) * m
    packing = Packing.bshd(seq_len) if fmt == "bshd" else Packing.thd(m)
    data_rows, native = [], 0
    for c in range(cp):
        for t in range(tp):
            h = layout_routing(samples, GEO, packing,
                               RankSlice(tp_size=tp, tp_rank=t, sequence_parallel=True,
                                         cp_size=cp, cp_rank=c))
            data_rows.append(h.ids[h.region < PAD].reshape(-1, GEO.ids_per_token))
            native += int(h.native.sum())
    want = np.concatenate([s.routed[~s.native] if s.native is not None else s.routed
                           for s in samples]).reshape(-1, GEO.ids_per_token)
    got = np.concatenate(data_rows)
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    assert native == sum(s.routed_start + s.native_rows for s in samples)
