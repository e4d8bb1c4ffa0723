"""A Megatron ``forward_step_func`` built from a loss: the forward-step / loss-function pair
that the recipes, the GPU scripts and the tests share.

Each micro-batch is a mapping holding at least ``tokens``, ``position_ids`` and
``attention_mask`` (what a ``GPTModel`` takes); the loss gets the whole mapping, so it can read
anything else the trainer put there (advantages, masks, reference log-probs)::

    forward_step = replay.wrap_forward_step(make_forward_step(my_loss))
    forward_backward_func(forward_step_func=forward_step, data_iterator=iter(batches), ...)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["Loss", "make_forward_step", "squared_output_loss"]

Loss = Callable[[Mapping[str, Any], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss(batch, output) -> (loss, logged)``: Megatron's ``loss_func`` with its batch."""


def squared_output_loss(
    batch: Mapping[str, Any], output: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``mean(output ** 2)``: a stand-in loss whose gradient reaches every router (tests and
    benchmarks)."""
    loss = output.float().pow(2).mean()
    return loss, {"loss": loss.detach()}


def make_forward_step(
    loss: Loss = squared_output_loss,
) -> Callable[[Iterator[Mapping[str, Any]], torch.nn.Module], tuple[torch.Tensor, Any]]:
    """``forward_step(data_iterator, model)``: the next micro-batch through
    ``model(tokens, position_ids, attention_mask)``, returned with ``loss`` bound to that
    micro-batch as Megatron's ``loss_func``."""

    def forward_step(
        data_iterator: Iterator[Mapping[str, Any]], model: torch.nn.Module
    ) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        return output, functools.partial(loss, batch)

    return forward_step
