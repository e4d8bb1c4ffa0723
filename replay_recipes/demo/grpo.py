"""The GRPO-style objective: a toy reward, group-normalised advantages, and the clipped policy
loss with the importance ratio taken against the rollout engine's log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replay_bridge.sample import RoutedSample

__all__ = ["PolicyLoss", "group_advantages", "policy_loss", "rewards", "target_tokens"]


def target_tokens(vocab_size: int, fraction: float, seed: int) -> np.ndarray:
    """``bool [vocab_size]``: a fixed random set of ``fraction`` of the vocabulary."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(vocab_size)[: max(1, int(round(fraction * vocab_size)))]
    mask = np.zeros(vocab_size, bool)
    mask[chosen] = True
    return mask


def rewards(samples: Sequence[RoutedSample], target: np.ndarray) -> np.ndarray:
    """Per sample, the fraction of its completion tokens that are in ``target``."""
    out = np.empty(len(samples), np.float64)
    for i, s in enumerate(samples):
        comp = np.asarray(s.tokens[s.prompt_len :], np.int64)
        out[i] = target[np.clip(comp, 0, target.size - 1)].mean() if comp.size else 0.0
    return out


def group_advantages(values: np.ndarray, groups: Sequence[str], eps: float = 1e-6) -> np.ndarray:
    """``(r - mean of its group) / (std of its group + eps)``; a group of one gets 0."""
    values = np.asarray(values, np.float64)
    _, inverse, counts = np.unique(np.asarray(groups, dtype=object).astype(str),
                                   return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, values)
    means = sums / counts
    var = np.bincount(inverse, (values - means[inverse]) ** 2) / counts
    return (values - means[inverse]) / (np.sqrt(var)[inverse] + eps)


@dataclass
class PolicyLoss:
    """Sums over a micro-batch's completion tokens (divide by the step's token count)."""

    loss: torch.Tensor
    clipped: int
    ratio_sum: float


def policy_loss(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> PolicyLoss:
    """PPO-clip: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` per completion token,
    ``ratio = exp(logp - rollout_logp)``; ``logp`` / ``rollout_logp`` / ``mask`` are
    ``[b, T]``, ``advantages`` ``[b]``."""
    ratio = torch.exp(torch.where(mask, logp - rollout_logp, torch.zeros_like(logp)))
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    with torch.no_grad():
        was_clipped = ((clipped < unclipped) & mask).sum()
        ratio_sum = ratio[mask].sum()
    return PolicyLoss(loss, int(was_clipped), float(ratio_sum))
