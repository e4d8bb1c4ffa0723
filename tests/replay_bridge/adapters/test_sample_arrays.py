"""from_sample_arrays: slime/miles per-sample [tokens - 1, layers, k] arrays give the verdicts
the engine path gives the same rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_bridge import AdaptedBatch, RoutingGeometry, from_sample_arrays
from tests.replay_bridge.adapters.batches import (DENSE_PREFIX, SPARSE_STEP, Rollout,
                                                  assert_same_verdict, engine_verdict,
                                                  rollouts)

G = DENSE_PREFIX
LENGTHS = [(5, 4), (3, 7), (6, 1), (2, 0)]


def adapt(samples: list[Rollout], routings: list | None = None, g: RoutingGeometry = G,
          **kw) -> AdaptedBatch:
    routings = [s.rows for s in samples] if routings is None else routings
    kw.setdefault("routed_start", [s.start for s in samples])
    return from_sample_arrays(routings, [s.tokens for s in samples],
                              [s.prompt.size for s in samples],
                              [s.sample_id for s in samples], g, **kw)


def assert_like_engine(batch: AdaptedBatch, samples: list[Rollout],
                       g: RoutingGeometry = G) -> None:
    assert len(batch) == len(samples)
    for i, s in enumerate(samples):
        assert_same_verdict((batch.reports[i], batch.samples[i]), engine_verdict(s, g))


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint8"])
def test_good_arrays_match_the_engine_path(rng, dtype):
    samples = rollouts(rng, G, LENGTHS)
    batch = adapt(samples, [s.rows.astype(dtype) for s in samples])
    assert batch.ok and len(batch.accepted) == 4
    assert_like_engine(batch, samples)


def test_routed_start(rng):
    samples = rollouts(rng, G, [(6, 3), (4, 4)], start=3)
    batch = adapt(samples)
    assert batch.ok and [s.rows for s in batch.samples] == [5, 4]
    assert_like_engine(batch, samples)


@pytest.mark.parametrize("g", [DENSE_PREFIX, SPARSE_STEP], ids=["dense-prefix", "sparse-step"])
def test_moe_only_arrays_give_what_wire_arrays_give(rng, g):
    samples = rollouts(rng, g, LENGTHS)
    samples[0].rows[3, g.moe_layers[-1]] = 0
    moe = adapt(samples, [s.moe_rows(g) for s in samples], g)
    assert [r.kinds for r in moe.reports] == [("all_zero",), (), (), ()]
    assert moe.reports[0].first["all_zero"] == (3, g.moe_layers[-1])
    assert_like_engine(moe, samples, g)


def test_bad_arrays_get_the_engine_verdicts(rng):
    samples = rollouts(rng, G, LENGTHS)
    samples[0].rows[7, 2, 0] = 32  # out of range at completion position 7
    samples[1].rows[0, 4] = [5, 5, 6, 7]
    samples[3].rows[0, 3, 1] = -1  # -1 without a mark: out of range, as from an engine
    batch = adapt(samples, [s.rows.astype(np.int16) for s in samples])
    assert [r.kinds for r in batch.reports] == [
        ("out_of_range",), ("duplicate_ids",), (), ("out_of_range",)]
    assert batch.reports[0].first["out_of_range"] == (7, 2)
    assert batch.reports[0].bad_by_region("out_of_range") == {"prompt": 0, "completion": 1}
    assert_like_engine(batch, samples)


def test_a_row_count_or_shape_is_that_samples_verdict(rng):
    samples = rollouts(rng, G, [(5, 4), (3, 3), (4, 2), (2, 2)])
    routings = [samples[0].rows[:-1],  # the last completion row missing
                np.concatenate([samples[1].rows, samples[1].rows[-1:]]),  # one extra row
                samples[2].rows[:, :4],  # 4 layers: neither every layer nor the MoE ones
                None]  # no routing at all
    batch = adapt(samples, routings)
    assert [r.kinds for r in batch.reports] == [
        ("row_count",), ("row_count",), ("shape",), ("missing_routing",)]
    assert "7 routing rows, expected 8" in batch.reports[0].message
    assert "expected [rows, 5, 4]" in batch.reports[2].message
    assert batch.reports[3].message == ("sample 's3': missing_routing: no routing array was "
                                        "given for this sample")
    assert batch.tally.by_kind == {"row_count": 2, "shape": 1, "missing_routing": 1}


def test_non_integer_routing_is_malformed(rng):
    samples = rollouts(rng, G, [(3, 2)])
    batch = adapt(samples, [samples[0].rows.astype(np.float32)])
    assert batch.reports[0].kinds == ("malformed",)


def test_torch_tensors_and_ownership(rng):
    samples = rollouts(rng, G, LENGTHS)
    tensors = [torch.from_numpy(s.moe_rows(G).astype(np.uint8)) for s in samples]
    batch = from_sample_arrays(tensors, [torch.from_numpy(s.tokens) for s in samples],
                               torch.tensor([s.prompt.size for s in samples]),
                               [s.sample_id for s in samples], G)
    assert_like_engine(batch, samples)
    for t in tensors:
        t.fill_(1)  # the framework reuses its buffers
    np.testing.assert_array_equal(batch.samples[0].routed, samples[0].moe_rows(G))


def test_all_layer_uint8_arrays_are_not_aliased(rng):
    g = RoutingGeometry(3, (0, 1, 2), 2, 8)  # all MoE: the stored ids could be the input's
    samples = rollouts(rng, g, [(3, 2)])
    source = samples[0].rows.astype(np.uint8)
    batch = adapt(samples, [source], g)
    source[:] = 0
    np.testing.assert_array_equal(batch.samples[0].routed, samples[0].rows)


def test_metadata(rng):
    samples = rollouts(rng, G, [(3, 2), (4, 3)])
    batch = adapt(samples, group_ids=["g", None], policy_version=[3, None],
                  logprobs=[[-0.5, -0.25], None], engine="vllm")
    a, b = batch.samples
    assert (a.group_id, a.policy_version, a.engine) == ("g", 3, "vllm")
    assert (b.group_id, b.policy_version, b.logprobs) == (None, None, None)
    np.testing.assert_array_equal(a.logprobs, np.float32([-0.5, -0.25]))


def test_too_many_logprobs_are_malformed(rng):
    samples = rollouts(rng, G, [(3, 2)])
    assert adapt(samples, logprobs=[[-1.0, -1.0, -1.0]]).reports[0].kinds == ("malformed",)


def test_refused_calls(rng):
    samples = rollouts(rng, G, [(3, 2), (4, 3)])
    with pytest.raises(ValueError, match="1 routings for 2 sample ids"):
        adapt(samples, [samples[0].rows])
    with pytest.raises(ValueError, match=r"sample 's1' \(row 1\): prompt length 8 outside"):
        from_sample_arrays([s.rows for s in samples], [s.tokens for s in samples], [3, 8],
                           ["s0", "s1"], G)
    with pytest.raises(ValueError, match="sample 's0': token 1 is -4"):
        from_sample_arrays([s.rows for s in samples],
                           [np.array([1, -4, 2, 3, 4]), samples[1].tokens], [3, 4],
                           ["s0", "s1"], G)
    with pytest.raises(ValueError, match="sample_id is empty"):
        from_sample_arrays([s.rows for s in samples], [s.tokens for s in samples], [3, 4],
                           ["s0", ""], G)
    with pytest.raises(ValueError, match="group_id 5 is an int"):
        adapt(samples, group_ids=["g", 5])
