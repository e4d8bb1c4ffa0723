"""One training run on the stored rollouts: the checkpoint loaded into a megatron-core
``GPTModel`` (fp32), then a few GRPO-style optimizer steps, with rollout routing replay off or
on. Every step's forward is measured before its update: routing used vs rollout routing, the
routers' own top-k vs the replayed ids (replay on), and the log-prob mismatch.

Step 0's forward runs the very weights the engine served (the checkpoint, upcast to fp32), so its
figures are the train-inference mismatch itself; later steps add the policy's own drift.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from .batches import MicroBatch
from .config import TrainConfig
from ..grpo import policy_loss, token_logprobs
from trainer_hooks.megatron.cpu_world import fresh_router_replay_list
from .mismatch import RoutingMeter, logp_mismatch

__all__ = ["RunResult", "StepFigures", "run_steps", "train_run"]


@dataclass
class StepFigures:
    step: int
    routing_used: dict[str, Any]
    """Experts the routers actually used vs the rollout's ids (see :class:`RoutingMeter`)."""
    router_own: dict[str, float]
    """Replay on: the replay controller's metrics (the routers' own top-k vs the replayed ids);
    empty with replay off, where the own top-k is what was used."""
    logp: dict[str, float]
    loss: float
    clip_fraction: float
    mean_ratio: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "agreement": self.routing_used["exact"],
            "agreement_overlap": self.routing_used["overlap"],
            "router_own_agreement": self.router_own.get("routing_replay/exact"),
            **{k: v for k, v in self.logp.items()},
            "loss": self.loss,
            "clip_fraction": self.clip_fraction,
            "mean_ratio": self.mean_ratio,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunResult:
    replay: bool
    steps: list[StepFigures] = field(default_factory=list)
    first_step_diffs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """``logp_trainer - logp_rollout`` of every completion token at step 0."""
    parameters: int = 0
    seconds: float = 0.0


def _forward(batch: MicroBatch, model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=batch.tokens, position_ids=batch.position_ids,
                 attention_mask=batch.attention_mask)


def run_steps(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    hosts: list[Any],
    meter: Any,
    config: TrainConfig,
    result: RunResult,
    *,
    forward: Callable[[MicroBatch], torch.Tensor],
    temperature: float,
    step_pass: Callable[[], Any] = contextlib.nullcontext,
    micro_pass: Callable[[int], Any] = lambda _i: contextlib.nullcontext(),
    router_own: Callable[[], dict[str, float]] = dict,
) -> None:
    """``config.steps`` GRPO-style steps over all ``micro_batches`` (one optimizer step each,
    gradients accumulated over micro-batches), appending each step's figures to ``result``;
    the same loop for every trainer. ``hosts``: each micro-batch's laid-out rollout routing
    for the ``meter``; ``forward(mb)``: the model's logits ``[b, L, vocab]``; ``step_pass()``
    wraps a step's micro-batches, ``micro_pass(i)`` micro-batch ``i``'s forward and backward
    (where a replay pass goes); ``router_own()``: the replay's metrics after a step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    total_tokens = sum(mb.completion_tokens for mb in micro_batches)
    model.train()
    for step in range(config.steps):
        ts = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        diffs: list[np.ndarray] = []
        loss_sum = ratio_sum = 0.0
        clipped = 0
        with step_pass():
            for i, (mb, host) in enumerate(zip(micro_batches, hosts)):
                with micro_pass(i):
                    meter.expect(host)
                    logits = forward(mb)
                    logp = token_logprobs(logits, mb.targets, temperature)
                    pl = policy_loss(logp, mb.rollout_logp, mb.advantages, mb.completion,
                                     config.clip_eps)
                    (pl.loss / total_tokens).backward()
                loss_sum += float(pl.loss.detach())
                clipped += pl.clipped
                ratio_sum += pl.ratio_sum
                diffs.append((logp.detach() - mb.rollout_logp)[mb.completion].numpy())
        optimizer.step()
        r = np.concatenate(diffs)
        if step == 0:
            result.first_step_diffs = r
        result.steps.append(StepFigures(
            step=step,
            routing_used=meter.read(),
            router_own=router_own(),
            logp=logp_mismatch(r),
            loss=loss_sum / total_tokens,
            clip_fraction=clipped / total_tokens,
            mean_ratio=ratio_sum / total_tokens,
            seconds=time.perf_counter() - ts,
        ))


def train_run(
    model_dir: Path,
    source: Mapping[str, RoutedSample],
    geometry: RoutingGeometry,
    micro_batches: list[MicroBatch],
    config: TrainConfig,
    *,
    replay: bool,
    temperature: float,
) -> RunResult:
    """Build the model from ``model_dir`` and run ``config.steps`` steps over all
    ``micro_batches`` (:func:`run_steps`). ``source`` holds the rollout routing (a shard
    reader) in ``geometry``.

    Needs a megatron world (:func:`~trainer_hooks.megatron.cpu_world.megatron_cpu_world`).
    """
    from trainer_hooks.megatron import RoutingReplay
    from trainer_hooks.megatron.convert import build_qwen3_moe_gpt

    t0 = time.perf_counter()
    fresh_router_replay_list()
    model = build_qwen3_moe_gpt(model_dir, routing_replay=True, dtype=torch.float32)
    controller = RoutingReplay(model, geometry, source=source)
    meter = RoutingMeter(model, controller.layers, geometry.top_k)
    step_fn = controller.wrap_forward_step(_forward)
    result = RunResult(replay=replay, parameters=sum(p.numel() for p in model.parameters()))
    try:
        # Every step trains on the same micro-batches: their routing is laid out (and, replay
        # on, uploaded) once.
        routing = ([controller.prepare(mb.samples, mb.packing) for mb in micro_batches]
                   if replay else None)
        hosts = ([r.host for r in routing] if routing is not None
                 else [controller.layout(mb.samples, mb.packing) for mb in micro_batches])
        run_steps(
            model, micro_batches, hosts, meter, config, result,
            forward=lambda mb: step_fn(mb, model), temperature=temperature,
            step_pass=((lambda: controller.replaying(routing)) if routing is not None
                       else contextlib.nullcontext),
            router_own=controller.metrics if replay else dict,
        )
    finally:
        meter.close()
        controller.close()
        fresh_router_replay_list()
    result.seconds = time.perf_counter() - t0
    return result
