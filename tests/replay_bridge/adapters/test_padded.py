"""from_padded_batch: verl's [batch, seq, layers, k] with an attention mask gives the verdicts
the engine path gives the same rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge import (AdaptedBatch, RoutingGeometry, RoutingRejected, from_padded_batch)
from tests.replay_bridge.adapters.batches import (DENSE_PREFIX, JUNK, SPARSE_STEP, Padded,
                                                  Rollout, assert_same_verdict,
                                                  engine_verdict, padded, rollouts)

G = DENSE_PREFIX
LENGTHS = [(5, 4), (3, 7), (6, 1), (2, 0)]
LAYOUTS = {
    "left": ([4, 3, 4, 9], [0, 0, 0, 0]),  # prompts left-padded, no response padding
    "right": ([0, 0, 0, 0], [3, 0, 6, 7]),
    "both": ([2, 5, 0, 1], [3, 1, 6, 4]),  # verl: left-padded prompt + right-padded response
}


def adapt(p: Padded, g: RoutingGeometry = G, **kw) -> AdaptedBatch:
    return from_padded_batch(p.routing, p.attention_mask, p.input_ids, p.prompt_lengths,
                             p.sample_ids, g, routed_start=p.routed_start, **kw)


def assert_like_engine(batch: AdaptedBatch, samples: list[Rollout],
                       g: RoutingGeometry = G) -> None:
    assert len(batch) == len(samples)
    for i, s in enumerate(samples):
        assert_same_verdict((batch.reports[i], batch.samples[i]), engine_verdict(s, g))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint8"])
def test_padding_layouts_and_dtypes_match_the_engine_path(rng, layout, dtype):
    samples = rollouts(rng, G, LENGTHS)
    batch = adapt(padded(samples, G, *LAYOUTS[layout], dtype=dtype))
    assert batch.ok and len(batch.accepted) == 4 and batch.rejected == []
    assert_like_engine(batch, samples)
    batch.raise_for_rejects()  # nothing to raise


def test_rows_are_the_valid_positions_but_the_last(rng):
    samples = rollouts(rng, G, LENGTHS)
    batch = adapt(padded(samples, G, *LAYOUTS["both"]))
    for s, routed in zip(samples, batch.samples):
        assert routed.rows == s.n - 1
        np.testing.assert_array_equal(routed.routed, s.moe_rows(G))
        np.testing.assert_array_equal(routed.tokens, s.tokens)
        assert routed.prompt_len == s.prompt.size


def test_torch_tensors_give_what_numpy_gives(rng):
    samples = rollouts(rng, G, LENGTHS)
    p = padded(samples, G, *LAYOUTS["both"], dtype="int16")
    ref = adapt(p)
    got = from_padded_batch(torch.from_numpy(p.routing), torch.from_numpy(p.attention_mask).bool(),
                            torch.from_numpy(p.input_ids), torch.from_numpy(p.prompt_lengths),
                            p.sample_ids, G)
    for a, b in zip(got.samples, ref.samples):
        np.testing.assert_array_equal(a.routed, b.routed)
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert_like_engine(got, samples)


def test_samples_do_not_alias_the_callers_tensor(rng):
    samples = rollouts(rng, G, LENGTHS)
    p = padded(samples, G, *LAYOUTS["right"], dtype="uint8")
    t = torch.from_numpy(p.routing)
    batch = from_padded_batch(t, p.attention_mask, p.input_ids, p.prompt_lengths,
                              p.sample_ids, G)
    t.fill_(5)  # the framework reuses its buffer
    np.testing.assert_array_equal(batch.samples[0].routed, samples[0].moe_rows(G))


@pytest.mark.parametrize("g", [DENSE_PREFIX, SPARSE_STEP], ids=["dense-prefix", "sparse-step"])
def test_moe_only_input_gives_what_all_layer_input_gives(rng, g):
    samples = rollouts(rng, g, LENGTHS)
    samples[1].rows[4, g.moe_layers[1]] = [9, 9] + [1] * (g.top_k - 2)  # one duplicate block
    wire = adapt(padded(samples, g, *LAYOUTS["both"]), g)
    moe = adapt(padded(samples, g, *LAYOUTS["both"], moe_only=True), g)
    assert [r.kinds for r in moe.reports] == [(), ("duplicate_ids",), (), ()]
    for a, b in zip(moe.reports, wire.reports):
        assert (a.message, a.first) == (b.message, b.first)
    assert moe.reports[1].first["duplicate_ids"] == (4, g.moe_layers[1])  # a wire layer index
    assert_like_engine(moe, samples, g)


def test_dense_layer_blocks_are_never_looked_at(rng):
    samples = rollouts(rng, G, LENGTHS)
    p = padded(samples, G, *LAYOUTS["left"])
    p.routing[:, :, list(G.dense_layers)] = -9  # garbage in dense layers everywhere
    assert adapt(p).ok


def test_a_preset_geometry(rng):
    g = RoutingGeometry.from_preset("deepseek-v3")  # 61 layers, first 3 dense, top-8 of 256
    samples = rollouts(rng, g, [(4, 3), (2, 5)])
    batch = adapt(padded(samples, g, [1, 0], [0, 2], dtype="uint8", moe_only=True), g)
    assert batch.ok
    assert batch.samples[0].routed.shape == (6, 58, 8)
    assert_like_engine(batch, samples, g)


def test_bad_ids_get_the_engine_verdicts(rng):
    samples = rollouts(rng, G, LENGTHS)
    samples[0].rows[2, 3, 1] = 40  # out of range, prompt position 2, layer 3
    samples[1].rows[:3] = 0  # all-zero prompt rows (SGLang PR #23885)
    samples[2].rows[5, 4] = [1, 2, 1, 3]  # duplicate ids, completion position 5
    samples[3].rows[0, 2, 0] = -1  # an engine that sent -1: out of range, no mark asked
    batch = adapt(padded(samples, G, *LAYOUTS["both"], dtype="int16"))
    assert [r.kinds for r in batch.reports] == [
        ("out_of_range",), ("all_zero",), ("duplicate_ids",), ("out_of_range",)]
    assert batch.samples == [None] * 4 and batch.accepted == []
    assert batch.reports[0].first["out_of_range"] == (2, 3)
    assert batch.reports[3].first["out_of_range"] == (0, 2)
    assert_like_engine(batch, samples)


def test_raise_for_rejects_names_the_first_bad_sample(rng):
    samples = rollouts(rng, G, LENGTHS)
    samples[1].rows[6, 4, 2] = 33
    samples[3].rows[0] = 0
    batch = adapt(padded(samples, G, *LAYOUTS["right"]))
    assert [s is not None for s in batch.samples] == [True, False, True, False]
    assert [r.sample_id for r in batch.rejected] == ["s1", "s3"]
    with pytest.raises(RoutingRejected) as e:
        batch.raise_for_rejects()
    msg = str(e.value)
    assert msg.startswith("2 of 4 samples rejected; first: sample 's1': out_of_range")
    assert "first at position 6 layer 4" in msg
    assert isinstance(e.value, ValueError) and len(e.value.reports) == 2


def test_tally_counts_verdicts_and_tokens(rng):
    samples = rollouts(rng, G, LENGTHS)
    samples[2].rows[1, 2] = 0
    tally = adapt(padded(samples, G, *LAYOUTS["both"])).tally
    d = tally.to_dict()
    assert (d["samples"], d["good"], d["rejected"]) == (4, 3, 1)
    assert d["by_kind"] == {"all_zero": 1}
    # rows are positions 0 .. n - 2: (5, 4) -> 5 + 3, (3, 7) -> 3 + 6, (6, 1) -> 6 + 0,
    # (2, 0) -> 1 + 0
    assert d["regions"]["prompt"]["tokens"] == 5 + 3 + 6 + 1
    assert d["regions"]["completion"]["tokens"] == 3 + 6 + 0 + 0


def test_routed_start_skips_rows_before_it(rng):
    samples = rollouts(rng, G, [(5, 4), (6, 2), (4, 3)], start=2)
    p = padded(samples, G, [0, 2, 1], [1, 0, 3])
    p.routing[0, 0:2] = JUNK  # positions before routed_start hold no routing
    batch = adapt(p)
    assert batch.ok and [s.routed_start for s in batch.samples] == [2, 2, 2]
    assert [s.rows for s in batch.samples] == [6, 5, 4]
    assert_like_engine(batch, samples)


def test_per_row_routed_start(rng):
    samples = [*rollouts(rng, G, [(5, 4)], start=0), *rollouts(rng, G, [(6, 2)], start=6)]
    samples[1].sample_id = "t"
    p = padded(samples, G, [0, 0], [0, 1])
    batch = adapt(p)
    assert [s.rows for s in batch.samples] == [8, 1]
    assert_like_engine(batch, samples)


def test_metadata_and_verl_logprobs(rng):
    samples = rollouts(rng, G, [(5, 4), (3, 2)])
    p = padded(samples, G, [0, 2], [0, 2])
    logprobs = np.array([[-0.1, -0.2, -0.3, -0.4, 0.0], [-1.0, -2.0, 0.0, 0.0, 0.0]])
    batch = adapt(p, group_ids=["g", "g"], policy_version=7, logprobs=logprobs, engine="sglang")
    a, b = batch.samples
    np.testing.assert_array_equal(a.logprobs, np.float32([-0.1, -0.2, -0.3, -0.4]))
    np.testing.assert_array_equal(b.logprobs, np.float32([-1.0, -2.0]))
    assert (a.group_id, a.policy_version, a.engine) == ("g", 7, "sglang")
    assert adapt(p, policy_version=[1, 2]).samples[1].policy_version == 2


# ---- refused calls -------------------------------------------------------------------------


@pytest.fixture
def batch_arrays(rng) -> Padded:
    return padded(rollouts(rng, G, LENGTHS), G, *LAYOUTS["both"])


def test_a_hole_in_the_mask_is_refused_naming_the_row(batch_arrays):
    p = batch_arrays
    row = p.attention_mask[2]
    cols = np.flatnonzero(row)
    row[cols[3]] = 0
    with pytest.raises(ValueError, match=rf"attention_mask row 2 \(sample 's2'\) has a hole: "
                       rf"its valid tokens span columns {cols[0]}\.\.{cols[-1]} but column "
                       rf"{cols[3]} is 0"):
        adapt(p)


def test_a_row_without_valid_tokens_is_refused(batch_arrays):
    batch_arrays.attention_mask[1] = 0
    with pytest.raises(ValueError, match=r"row 1 \(sample 's1'\) has no valid token"):
        adapt(batch_arrays)


def test_a_mask_value_other_than_0_or_1_is_refused(batch_arrays):
    batch_arrays.attention_mask[0, 3] = 2
    with pytest.raises(ValueError, match="holds 2 at row 0 column 3; expected 0 or 1"):
        adapt(batch_arrays)


@pytest.mark.parametrize("layers", [4, 2, 1])
def test_a_layer_axis_of_neither_size_is_refused(layers):
    r = np.zeros((2, 6, layers, G.top_k), np.int32)
    mask = np.ones((2, 6), np.int64)
    with pytest.raises(ValueError, match=rf"routing has {layers} layers; expected 5 \(every "
                       r"hidden layer\) or 3 \(MoE layers only\)"):
        from_padded_batch(r, mask, mask, [3, 3], ["a", "b"], G)


def test_a_top_k_other_than_the_geometrys_is_refused():
    mask = np.ones((1, 4), np.int64)
    with pytest.raises(ValueError, match="holds 3 ids per layer, expected top_k 4"):
        from_padded_batch(np.zeros((1, 4, 5, 3), np.int32), mask, mask, [2], ["a"], G)


def test_float_routing_is_refused():
    mask = np.ones((1, 4), np.int64)
    with pytest.raises(ValueError, match="routing has dtype float32"):
        from_padded_batch(np.zeros((1, 4, 5, 4), np.float32), mask, mask, [2], ["a"], G)


@pytest.mark.parametrize("prompt, match", [
    (0, r"sample 's0' \(row 0\): prompt length 0 outside \[1, 9\]"),
    (10, r"sample 's0' \(row 0\): prompt length 10 outside \[1, 9\]"),
])
def test_prompt_lengths_outside_the_row_are_refused(batch_arrays, prompt, match):
    batch_arrays.prompt_lengths[0] = prompt
    with pytest.raises(ValueError, match=match):
        adapt(batch_arrays)


def test_routed_start_past_the_prompt_is_refused(batch_arrays):
    batch_arrays.routed_start[3] = 3
    with pytest.raises(ValueError, match=r"sample 's3' \(row 3\): routed_start 3 outside"):
        adapt(batch_arrays)


def test_shapes_that_disagree_are_refused(batch_arrays):
    p = batch_arrays
    with pytest.raises(ValueError, match="input_ids has shape"):
        from_padded_batch(p.routing, p.attention_mask, p.input_ids[:, 1:], p.prompt_lengths,
                          p.sample_ids, G)
    with pytest.raises(ValueError, match="3 sample ids for 4 samples"):
        from_padded_batch(p.routing, p.attention_mask, p.input_ids, p.prompt_lengths,
                          p.sample_ids[:3], G)
    with pytest.raises(ValueError, match="sample id 's0' appears twice"):
        from_padded_batch(p.routing, p.attention_mask, p.input_ids, p.prompt_lengths,
                          ["s0", "s1", "s0", "s3"], G)


def test_negative_token_ids_at_valid_positions_are_refused(batch_arrays):
    p = batch_arrays
    col = int(np.flatnonzero(p.attention_mask[1])[2])
    p.input_ids[1, col] = -100
    with pytest.raises(ValueError, match=rf"input_ids row 1 \(sample 's1'\) column {col} "
                       r"holds -100"):
        adapt(p)


def test_an_empty_batch():
    empty = np.zeros((0, 5), np.int64)
    batch = from_padded_batch(np.zeros((0, 5, 5, 4), np.int32), empty, empty, [], [], G)
    assert len(batch) == 0 and batch.ok and batch.tally.samples == 0


# ---- any padding layout ---------------------------------------------------------------------


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 5))
    lengths = [(draw(st.integers(1, 7)), draw(st.integers(0, 6))) for _ in range(n)]
    left = [draw(st.integers(0, 4)) for _ in range(n)]
    right = [draw(st.integers(0, 4)) for _ in range(n)]
    starts = [draw(st.integers(0, p)) for p, _ in lengths]
    return (lengths, left, right, starts, draw(st.sampled_from(["int16", "int32", "uint8"])),
            draw(st.booleans()), draw(st.integers(0, 2**31)))


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_any_padding_layout_matches_the_engine_path(case):
    lengths, left, right, starts, dtype, moe_only, seed = case
    rng = np.random.default_rng(seed)
    samples = [rollouts(rng, G, [pc], start=s)[0] for pc, s in zip(lengths, starts)]
    for i, s in enumerate(samples):
        s.sample_id = f"s{i}"
        if s.rows.shape[0] and rng.random() < 0.4:  # a bad block now and then
            s.rows[rng.integers(s.rows.shape[0]), rng.choice(G.moe_layers)] = 0
    batch = adapt(padded(samples, G, left, right, dtype=dtype, moe_only=moe_only))
    assert_like_engine(batch, samples)
