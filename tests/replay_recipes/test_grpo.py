"""The shared GRPO objective: reward, group-normalised advantages, next-token log-probs, clipped
policy loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_recipes.grpo import (
    group_advantages,
    policy_loss,
    rewards,
    target_tokens,
    token_logprobs,
)
from replay_bridge.sample import RoutedSample


def _sample(sid: str, prompt: list[int], completion: list[int]) -> RoutedSample:
    tokens = np.asarray(prompt + completion, np.int32)
    return RoutedSample(sample_id=sid, tokens=tokens, prompt_len=len(prompt),
                        routed=np.zeros((len(tokens) - 1, 1, 1), np.uint8))


def test_target_set_has_the_asked_size_and_is_seeded():
    a, b = target_tokens(100, 0.3, seed=1), target_tokens(100, 0.3, seed=1)
    assert a.sum() == 30 and np.array_equal(a, b)
    assert not np.array_equal(a, target_tokens(100, 0.3, seed=2))


def test_reward_counts_completion_tokens_only():
    target = np.zeros(10, bool)
    target[[1, 2]] = True
    s = _sample("a", [1, 1, 1], [1, 5, 2, 7])
    np.testing.assert_allclose(rewards([s], target), [0.5])


def test_advantages_are_normalised_within_each_group():
    r = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    groups = ["a", "a", "a", "b", "b", "c", "d"]
    adv = group_advantages(r, groups)
    np.testing.assert_allclose(adv[:3], [-1.2247, 0.0, 1.2247], atol=1e-3)
    np.testing.assert_allclose(adv[3:], 0.0)  # equal rewards and groups of one: no signal


def test_loss_at_ratio_one_is_minus_the_advantage_sum():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([2.0, -1.0])
    out = policy_loss(logp, logp.detach(), adv, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-(2 * 2 - 1 * 2))
    assert out.clipped == 0 and out.ratio_sum == pytest.approx(4.0)
    out.loss.backward()
    # d(-ratio * A)/d logp = -A at ratio 1, only on masked tokens
    assert torch.equal(logp.grad, torch.tensor([[-2.0, -2.0, 0.0], [0.0, 1.0, 1.0]]))


def test_ratio_beyond_the_clip_gets_no_gradient():
    rollout = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 (clipped), e^0.05
    out = policy_loss(logp, rollout, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                      clip_eps=0.2)
    assert out.clipped == 1
    out.loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] < 0.0


def test_per_token_advantages_match_per_sample_ones():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.9, -3.0], [-0.5, -1.2, -0.5]])  # clipped: [0, 0], [1, 2]
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([2.0, -1.0])
    a = policy_loss(logp, ref, adv, mask, clip_eps=0.2)
    b = policy_loss(logp, ref, adv[:, None].expand(2, 3), mask, clip_eps=0.2)
    assert torch.equal(a.loss, b.loss) and a.clipped == b.clipped == 2
    assert a.ratio_sum == pytest.approx(float(torch.exp(logp - ref)[mask].sum()))


def test_token_logprobs_are_the_next_tokens_at_the_temperature():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    lp = token_logprobs(logits, tokens[:, 1:], temperature=0.5)
    assert lp.shape == (2, 4)
    want = torch.log_softmax(logits[0, 2] / 0.5, -1)[tokens[0, 3]]
    assert lp[0, 2].item() == pytest.approx(want.item(), rel=1e-6)
