"""The GRPO objective the recipes share: a toy reward, group-normalised advantages, next-token
log-probs, and the PPO-clip policy loss with the importance ratio taken against reference
log-probs (the rollout engine's, or the step's own log-prob pass).

Needs only NumPy and torch. The loss path never reads a value back to the host: the figures
:class:`PolicyLoss` carries stay on the device until a caller reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replay_bridge.sample import RoutedSample

__all__ = [
    "PolicyLoss",
    "group_advantages",
    "policy_loss",
    "rewards",
    "target_tokens",
    "token_logprobs",
]


def target_tokens(vocab_size: int, fraction: float, seed: int) -> np.ndarray:
    """``bool [vocab_size]``: a fixed random set of ``fraction`` of the vocabulary."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(vocab_size)[: max(1, int(round(fraction * vocab_size)))]
    mask = np.zeros(vocab_size, bool)
    mask[chosen] = True
    return mask


def rewards(samples: Sequence[RoutedSample], target: np.ndarray) -> np.ndarray:
    """Per sample, the fraction of its completion tokens that are in ``target`` (a toy reward;
    bring your own)."""
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


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[b, L - 1]`` log-probs of the next tokens ``targets`` (``tokens[:, 1:]``) under
    ``logits [b, L, vocab]`` at the sampling temperature, in float32."""
    scaled = logits[:, :-1].float() / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None])[..., 0]


@dataclass
class PolicyLoss:
    """Sums over a micro-batch's completion tokens (divide by the step's token count), as
    device tensors; :attr:`clipped` and :attr:`ratio_sum` read figures back."""

    loss: torch.Tensor
    clipped_tokens: torch.Tensor
    ratio: torch.Tensor
    """``[b, T]`` importance ratios (detached; 1 outside ``mask``)."""
    mask: torch.Tensor

    @property
    def clipped(self) -> int:
        """Tokens whose clipped term was the smaller one (a host read)."""
        return int(self.clipped_tokens)

    @property
    def ratio_sum(self) -> float:
        """Sum of the importance ratios over the completion tokens (a host read)."""
        return float(self.ratio[self.mask].sum())


def policy_loss(
    logp: torch.Tensor,
    reference_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> PolicyLoss:
    """PPO-clip: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` per completion token,
    ``ratio = exp(logp - reference_logp)``; ``logp`` / ``reference_logp`` / ``mask`` (bool) are
    ``[b, T]``, ``advantages`` ``[b]`` (one per sample) or ``[b, T]`` (per token)."""
    ratio = torch.exp(torch.where(mask, logp - reference_logp, torch.zeros_like(logp)))
    adv = (advantages if advantages.dim() == logp.dim() else advantages[:, None]).to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    with torch.no_grad():
        was_clipped = ((clipped < unclipped) & mask).sum()
    return PolicyLoss(loss, was_clipped, ratio.detach(), mask)
