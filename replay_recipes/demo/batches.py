"""Stored samples as trainer micro-batches: right-padded ``bshd`` token tensors, next-token
targets, the completion mask and the rollout log-probs aligned with the trainer's positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replay_bridge.sample import RoutedSample
from trainer_hooks.megatron import Packing

__all__ = ["BatchError", "MicroBatch", "make_micro_batches"]


class BatchError(ValueError):
    """A stored sample the trainer cannot use (no rollout log-probs, no completion)."""


@dataclass
class MicroBatch:
    """``b`` samples padded to ``L`` tokens. Position ``t`` of ``targets`` / ``completion`` /
    ``rollout_logp`` is the prediction of token ``t + 1``."""

    samples: list[RoutedSample]
    packing: Packing
    tokens: torch.Tensor
    """``int64 [b, L]``."""
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    """``bool [1, 1, L, L]``, True where masked (megatron's convention)."""
    targets: torch.Tensor
    """``int64 [b, L - 1]``."""
    completion: torch.Tensor
    """``bool [b, L - 1]``: the target is a completion token."""
    rollout_logp: torch.Tensor
    """``float32 [b, L - 1]``, the engine's log-prob of each completion target (0 elsewhere)."""
    advantages: torch.Tensor
    """``float32 [b]``."""

    @property
    def completion_tokens(self) -> int:
        return int(self.completion.sum())


def _rollout_logprobs(s: RoutedSample) -> np.ndarray:
    lp = s.logprobs
    if lp is None:
        raise BatchError(f"sample {s.sample_id!r}: the engine returned no log-probs")
    lp = np.asarray(lp, np.float32)
    if lp.shape != (s.completion_len,) or not np.isfinite(lp).all():
        raise BatchError(f"sample {s.sample_id!r}: {lp.shape[0]} rollout log-probs (finite: "
                         f"{int(np.isfinite(lp).sum())}) for {s.completion_len} completion tokens")
    return lp


def _one(samples: Sequence[RoutedSample], advantages: Mapping[str, float]) -> MicroBatch:
    b = len(samples)
    length = max(s.num_tokens for s in samples)
    tokens = np.zeros((b, length), np.int64)
    completion = np.zeros((b, length - 1), bool)
    rollout = np.zeros((b, length - 1), np.float32)
    for i, s in enumerate(samples):
        if s.completion_len < 1:
            raise BatchError(f"sample {s.sample_id!r} has no completion tokens")
        n, p = s.num_tokens, s.prompt_len
        tokens[i, :n] = s.tokens
        completion[i, p - 1 : n - 1] = True
        rollout[i, p - 1 : n - 1] = _rollout_logprobs(s)
    t = torch.from_numpy(tokens)
    return MicroBatch(
        samples=list(samples),
        packing=Packing.bshd(length),
        tokens=t,
        position_ids=torch.arange(length).expand(b, length),
        attention_mask=torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None],
        targets=t[:, 1:],
        completion=torch.from_numpy(completion),
        rollout_logp=torch.from_numpy(rollout),
        advantages=torch.tensor([advantages[s.sample_id] for s in samples], dtype=torch.float32),
    )


def make_micro_batches(
    samples: Sequence[RoutedSample], advantages: Mapping[str, float], size: int
) -> list[MicroBatch]:
    """Consecutive micro-batches of at most ``size`` samples, in the given order."""
    if not samples:
        raise BatchError("no stored samples to train on")
    return [_one(samples[i : i + size], advantages) for i in range(0, len(samples), size)]
