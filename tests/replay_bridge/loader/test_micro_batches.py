"""A rank's micro-batches: token ids, loss masks, positions and sequence offsets exact for bshd
and THD, routing equal to ``layout_routing`` of the same samples, and only the rank's own
samples read."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.layout import COMPLETION, PAD, Packing, RankSlice, layout_routing
from replay_bridge.loader import LoaderError, RankLoader, assemble
from replay_bridge.sample import RoutedSample

from .helpers import GEO, MemoryReader, make_samples


def sample(sid: str, tokens: list[int], prompt_len: int) -> RoutedSample:
    n = len(tokens)
    routed = (np.arange(n - 1)[:, None, None] + np.arange(GEO.top_k)[None, None, :]
              + np.zeros((1, GEO.num_moe_layers, 1), int)) % GEO.num_experts
    return RoutedSample(sample_id=sid, tokens=np.asarray(tokens, np.int32),
                        prompt_len=prompt_len, routed=routed.astype(GEO.id_dtype))


A = sample("a", [11, 12, 13, 14, 15], 3)  # completion tokens 14, 15
B = sample("b", [21, 22, 23], 1)  # completion tokens 22, 23


def test_bshd_rows_exact():
    mb = assemble([A, B], Packing.bshd(6))
    assert mb.tokens.tolist() == [[11, 12, 13, 14, 15, 0], [21, 22, 23, 0, 0, 0]]
    assert mb.loss_mask.astype(int).tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert mb.label_mask.astype(int).tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert mb.position_ids.tolist() == [list(range(6))] * 2
    assert mb.seq_lengths.tolist() == [5, 3]
    assert mb.cu_seqlens.tolist() == [0, 5, 8] and mb.cu_seqlens_padded.tolist() == [0, 6, 12]
    assert mb.tokens.dtype == np.int64 and mb.loss_mask.dtype == bool and mb.num_tokens == 12


def test_thd_pack_exact():
    mb = assemble([A, B], Packing.thd(pad_multiple=4, pad_total_multiple=16))
    # a: 5 tokens padded to 8; b: 3 padded to 4, then to 8 for the pack's multiple of 16
    assert mb.tokens.tolist() == [11, 12, 13, 14, 15, 0, 0, 0, 21, 22, 23, 0, 0, 0, 0, 0]
    assert mb.position_ids.tolist() == [*range(8), *range(8)]
    assert np.flatnonzero(mb.loss_mask).tolist() == [3, 4, 9, 10]
    # position 7 (a's padding) must not predict b's first token, though b's prompt is 1 long
    assert np.flatnonzero(mb.label_mask).tolist() == [2, 3, 8, 9]
    assert mb.cu_seqlens.tolist() == [0, 5, 8] and mb.cu_seqlens_padded.tolist() == [0, 8, 16]


def test_a_completion_from_position_zero_is_not_predicted_across_sequences():
    c = sample("c", [31, 32], 0)
    mb = assemble([A, c], Packing.thd())
    assert np.flatnonzero(mb.loss_mask).tolist() == [3, 4, 5, 6]
    assert np.flatnonzero(mb.label_mask).tolist() == [2, 3, 5]


@pytest.mark.parametrize("packing", [Packing.bshd(48), Packing.thd(pad_multiple=4)],
                         ids=["bshd", "thd"])
def test_masks_and_positions_against_a_loop(packing):
    """Every micro-batch of every rank against a per-position rebuild."""
    samples = make_samples([4] * 6, solo=3, seed=8)
    for rank in range(3):
        for mb in RankLoader(MemoryReader(samples), world_size=3, rank=rank, packing=packing,
                             micro_batch_size=3, seed=2, step=1):
            rows = mb.tokens.reshape(-1)
            mask, pos = mb.loss_mask.reshape(-1), mb.position_ids.reshape(-1)
            for i, s in enumerate(mb.samples):
                a, z = int(mb.cu_seqlens_padded[i]), int(mb.cu_seqlens_padded[i + 1])
                n = s.num_tokens
                assert rows[a : a + n].tolist() == s.tokens.tolist()
                assert not rows[a + n : z].any()
                assert pos[a:z].tolist() == list(range(z - a))
                want = [s.prompt_len <= t < n for t in range(z - a)]
                assert mask[a:z].tolist() == want


@pytest.mark.parametrize(("packing", "rank_slice", "layers"), [
    (Packing.thd(), RankSlice(), None),
    (Packing.bshd(48), RankSlice(), (2, 5)),
    (Packing.thd(pad_multiple=4), RankSlice(cp_size=2, cp_rank=1), None),
    (Packing.bshd(48), RankSlice(tp_size=2, tp_rank=1, sequence_parallel=True), (1, 4)),
], ids=["thd", "bshd-layers", "thd-cp2", "bshd-tp2-sp"])
def test_routing_is_layout_routing_of_the_same_samples(packing, rank_slice, layers):
    samples = make_samples([3] * 5, solo=2, seed=6)
    n = 0
    for rank in range(2):
        loader = RankLoader(MemoryReader(samples), world_size=2, rank=rank, packing=packing,
                            micro_batch_size=2, seed=4, rank_slice=rank_slice, layers=layers)
        for mb in loader:
            want = layout_routing(mb.samples, GEO, packing, rank_slice, layers)
            got = mb.routing
            assert got is not None and got.sample_ids == mb.sample_ids
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.region, want.region)
            assert got.layers == want.layers == (layers or GEO.moe_layers)
            np.testing.assert_array_equal(got.cu_seqlens_padded, mb.cu_seqlens_padded)
            if rank_slice == RankSlice():  # the router's token count is the batch's
                assert got.num_tokens == mb.num_tokens
                mask = mb.loss_mask.T.reshape(-1) if packing.format == "bshd" else mb.loss_mask
                assert mask[got.region == COMPLETION].all()  # completion rows are in the loss
            n += 1
    assert n >= 4
    loader = RankLoader(MemoryReader(samples), world_size=2, rank=0, packing=packing,
                        micro_batch_size=2, routing=False)
    assert all(mb.routing is None for mb in loader)


def test_padding_routes_to_pad_rows():
    mb = next(iter(RankLoader(MemoryReader([A, B]), world_size=1, rank=0,
                              packing=Packing.bshd(6), micro_batch_size=2)))
    assert mb.routing is not None
    region = mb.routing.region.reshape(6, 2).T  # sequence-major back to [b, s]
    assert (region[~(mb.position_ids < mb.seq_lengths[:, None])] == PAD).all()


def test_each_rank_reads_only_its_own_samples_once():
    samples = make_samples([4] * 10, solo=6, seed=9)
    everyone = []
    for rank in range(4):
        reader = MemoryReader(samples)
        loader = RankLoader(reader, world_size=4, rank=rank, packing=Packing.thd(),
                            max_tokens=96, seed=3, step=2)
        assert reader.reads == []  # planning reads the index only
        mbs = list(loader)
        assert len(mbs) == len(loader) == len(loader.plan.micro_batches(rank))
        assert reader.ids_read == loader.sample_ids == loader.plan.ids(rank)
        assert len(reader.reads) == len(loader)  # one read per micro-batch
        assert [list(m.sample_ids) for m in mbs] == loader.plan.micro_batches(rank)
        everyone += reader.ids_read
    assert sorted(everyone) == sorted(s.sample_id for s in samples)


def test_for_step_is_a_fresh_loader_at_that_step():
    samples = make_samples([2] * 9, seed=1)
    reader = MemoryReader(samples)
    kw = dict(world_size=3, rank=1, packing=Packing.thd(), micro_batch_size=2, seed=5,
              groups_per_step=6)
    later = RankLoader(reader, **kw).for_step(4)
    fresh = RankLoader(reader, **kw, step=4)
    assert later.step == 4 and later.plan.to_dict() == fresh.plan.to_dict()
    assert "rank 1/3, step 4" in repr(later)


def test_a_reader_that_answers_other_samples_is_refused():
    samples = make_samples([2, 2], seed=1)
    reader = MemoryReader(samples)
    reader.read = lambda ids: [samples[0]] * len(ids)  # type: ignore[method-assign]
    loader = RankLoader(reader, world_size=1, rank=0, packing=Packing.thd(), micro_batch_size=2)
    with pytest.raises(LoaderError, match="the reader returned"):
        list(loader)
