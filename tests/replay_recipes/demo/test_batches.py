"""Stored samples as trainer micro-batches: targets, completion mask and rollout log-probs
line up with the trainer's positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_recipes.demo.batches import BatchError, make_micro_batches
from replay_bridge.sample import RoutedSample


def _sample(sid, prompt, completion, logprobs):
    tokens = np.asarray(prompt + completion, np.int32)
    return RoutedSample(sample_id=sid, tokens=tokens, prompt_len=len(prompt),
                        logprobs=None if logprobs is None else np.asarray(logprobs, np.float32),
                        routed=np.zeros((len(tokens) - 1, 4, 2), np.uint8))


def test_alignment_and_padding():
    a = _sample("a", [5, 6], [7, 8, 9], [-0.1, -0.2, -0.3])
    b = _sample("b", [1, 2, 3, 4], [10], [-1.5])
    (mb,) = make_micro_batches([a, b], {"a": 0.5, "b": -0.5}, size=8)
    assert mb.tokens.shape == (2, 5) and mb.packing.seq_length == 5
    assert mb.tokens[0].tolist() == [5, 6, 7, 8, 9]
    assert mb.tokens[1].tolist() == [1, 2, 3, 4, 10]
    # position t predicts token t + 1: completion targets are exactly the completion tokens
    assert mb.targets[mb.completion].tolist() == [7, 8, 9, 10]
    assert mb.completion[0].tolist() == [False, True, True, True]
    assert mb.completion[1].tolist() == [False, False, False, True]
    assert torch.equal(mb.rollout_logp[mb.completion],
                       torch.tensor([-0.1, -0.2, -0.3, -1.5]))
    assert mb.completion_tokens == 4
    assert mb.advantages.tolist() == [0.5, -0.5]
    assert mb.attention_mask.shape == (1, 1, 5, 5) and bool(mb.attention_mask[0, 0, 0, 1])


def test_micro_batches_split_in_order():
    samples = [_sample(f"s{i}", [1, 2], [3], [-1.0]) for i in range(5)]
    mbs = make_micro_batches(samples, {s.sample_id: 0.0 for s in samples}, size=2)
    assert [[s.sample_id for s in mb.samples] for mb in mbs] == [["s0", "s1"], ["s2", "s3"],
                                                                 ["s4"]]


@pytest.mark.parametrize("logprobs, match", [
    (None, "no log-probs"),
    ([-1.0], "1 rollout log-probs"),
    ([-1.0, float("nan")], "finite: 1"),
])
def test_missing_or_bad_rollout_logprobs_are_refused(logprobs, match):
    s = _sample("x", [1, 2], [3, 4], logprobs)
    with pytest.raises(BatchError, match=match):
        make_micro_batches([s], {"x": 0.0}, size=1)


def test_no_samples():
    with pytest.raises(BatchError, match="no stored samples"):
        make_micro_batches([], {}, size=1)
