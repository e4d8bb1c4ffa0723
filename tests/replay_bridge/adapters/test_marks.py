"""Rows a framework marks as having no routing (NeMo-RL, tunix: -1): native with ``mark``,
rejected without it; a partly marked row and a zero row are always rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_bridge import AdaptedBatch, from_padded_batch, from_sample_arrays
from tests.replay_bridge.adapters.batches import (DENSE_PREFIX, SPARSE_STEP, Rollout,
                                                  engine_verdict, padded, rollouts)

G = DENSE_PREFIX
LENGTHS = [(5, 4), (3, 7), (6, 1)]
LAYOUT = ([2, 5, 0], [3, 1, 6])


def padded_batch(samples: list[Rollout], mark: int | None = -1, *, moe_only: bool = False,
                 dtype: str = "int32", g=G) -> AdaptedBatch:
    p = padded(samples, g, *LAYOUT, dtype=dtype, moe_only=moe_only)
    return from_padded_batch(p.routing, p.attention_mask, p.input_ids, p.prompt_lengths,
                             p.sample_ids, g, mark=mark)


def array_batch(samples: list[Rollout], mark: int | None = -1, *, moe_only: bool = False,
                g=G) -> AdaptedBatch:
    return from_sample_arrays([s.moe_rows(g) if moe_only else s.rows for s in samples],
                              [s.tokens for s in samples], [s.prompt.size for s in samples],
                              [s.sample_id for s in samples], g, mark=mark)


ADAPTERS = {"padded": padded_batch, "arrays": array_batch}


def marked(rng, g=G) -> list[Rollout]:
    """Rollouts whose sample 0 marks prompt rows 1-2 and completion row 6, sample 1 none."""
    samples = rollouts(rng, g, LENGTHS)
    samples[0].rows[[1, 2, 6]] = -1  # every layer, dense ones included
    return samples


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("moe_only", [False, True], ids=["wire", "moe-only"])
def test_fully_marked_rows_become_native(rng, adapter, moe_only):
    samples = marked(rng)
    batch = ADAPTERS[adapter](samples, moe_only=moe_only)
    assert batch.ok, batch.rejected
    s0, s1, _ = batch.samples
    assert s0.native.tolist() == [r in (1, 2, 6) for r in range(8)]
    assert s1.native is None
    assert (batch.reports[0].native_rows, batch.reports[0].checked_rows) == (3, 5)
    assert batch.reports[0].native_by_region == {"prompt": 2, "completion": 1}
    assert not s0.routed[[1, 2, 6]].any()  # stored as 0, never read
    keep = [0, 3, 4, 5, 7]
    np.testing.assert_array_equal(s0.routed[keep], samples[0].moe_rows(G)[keep])
    full = s0.full_routing()
    assert (full[[1, 2, 6]] == -1).all() and (full[0] == samples[0].moe_rows(G)[0]).all()
    assert batch.tally.to_dict()["regions"]["prompt"]["native_rows"] == 2


def test_a_mark_needs_only_the_moe_layers(rng):
    """Dense-layer blocks are never looked at: a row marked in every MoE layer is native
    whatever its dense layers hold (an engine's zeros)."""
    samples = rollouts(rng, G, LENGTHS)
    samples[2].rows[4][list(G.moe_layers)] = -1
    batch = padded_batch(samples)
    assert batch.ok and batch.samples[2].native.tolist() == [r == 4 for r in range(6)]


def test_sparse_moe_layers(rng):
    samples = marked(rng, SPARSE_STEP)
    batch = padded_batch(samples, g=SPARSE_STEP, moe_only=True, dtype="int16")
    assert batch.ok and batch.samples[0].native_rows == 3


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_partly_marked_row_is_rejected_naming_position_and_layer(rng, adapter):
    samples = rollouts(rng, G, LENGTHS)
    samples[1].rows[5, 3:] = -1  # MoE layers 3 and 4 marked, layer 2 routed
    batch = ADAPTERS[adapter](samples)
    assert [r.kinds for r in batch.reports] == [(), ("out_of_range",), ()]
    report = batch.reports[1]
    assert report.first["out_of_range"] == (5, 3)
    assert report.bad_layers("out_of_range") == [3, 4]
    assert report.native_rows == 0 and batch.samples[1] is None
    with pytest.raises(ValueError, match=r"1 of 3 samples rejected; first: sample 's1': "
                       r"out_of_range: 2 blocks .* first at position 5 layer 3"):
        batch.raise_for_rejects()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_minus_one_without_a_mark_is_rejected_as_from_an_engine(rng, adapter):
    samples = marked(rng)
    batch = ADAPTERS[adapter](samples, mark=None)
    assert [r.kinds for r in batch.reports] == [("out_of_range",), (), ()]
    assert batch.reports[0].first["out_of_range"] == (1, 2)
    ref, _ = engine_verdict(samples[0], G)
    assert (batch.reports[0].kinds, batch.reports[0].message) == (ref.kinds, ref.message)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_zero_row_is_never_a_mark(rng, adapter):
    samples = rollouts(rng, G, LENGTHS)
    samples[2].rows[3] = 0
    batch = ADAPTERS[adapter](samples)
    assert [r.kinds for r in batch.reports] == [(), (), ("all_zero",)]
    assert batch.reports[2].first["all_zero"] == (3, 2)
    with pytest.raises(ValueError, match="mark 0 is an expert id"):
        ADAPTERS[adapter](samples, mark=0)


def test_a_mark_past_the_experts(rng):
    samples = rollouts(rng, G, LENGTHS)
    samples[0].rows[0] = 255
    batch = padded_batch(samples, mark=255, dtype="uint8")
    assert batch.ok and batch.samples[0].native_rows == 1
    assert padded_batch(samples, mark=None, dtype="uint8").reports[0].kinds == ("out_of_range",)


def test_unsigned_routing_cannot_hold_minus_one(rng):
    samples = rollouts(rng, G, LENGTHS)
    with pytest.raises(ValueError, match="routing is uint8, which cannot hold mark -1"):
        padded_batch(samples, dtype="uint8")
    with pytest.raises(ValueError, match="sample 's0''s routing is uint8, which cannot hold"):
        from_sample_arrays([s.rows.astype(np.uint8) for s in samples],
                           [s.tokens for s in samples], [5, 3, 6], ["s0", "s1", "s2"], G,
                           mark=-1)


def test_torch_marks(rng):
    samples = marked(rng)
    p = padded(samples, G, *LAYOUT, dtype="int64")
    batch = from_padded_batch(torch.from_numpy(p.routing), torch.from_numpy(p.attention_mask),
                              torch.from_numpy(p.input_ids), p.prompt_lengths, p.sample_ids,
                              G, mark=torch.tensor(-1).item())
    assert batch.ok and batch.samples[0].native_rows == 3


def test_marks_at_padded_positions_are_ignored(rng):
    samples = rollouts(rng, G, LENGTHS)
    p = padded(samples, G, *LAYOUT)
    p.routing[p.attention_mask == 0] = -1
    batch = from_padded_batch(p.routing, p.attention_mask, p.input_ids, p.prompt_lengths,
                              p.sample_ids, G, mark=-1)
    assert batch.ok and all(s.native is None for s in batch.samples)


def test_a_fully_marked_sample(rng):
    samples = rollouts(rng, G, [(4, 3)])
    samples[0].rows[:] = -1
    batch = array_batch(samples)
    assert batch.ok and batch.samples[0].native.all() and batch.reports[0].checked_rows == 0
