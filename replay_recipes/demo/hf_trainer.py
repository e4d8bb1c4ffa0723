"""``replay-bridge demo --trainer hf``: the training runs in Hugging Face ``transformers``.

The checkpoint is loaded with ``AutoModelForCausalLM.from_pretrained`` in float32 and trained
by the demo's own GRPO loop (:func:`~replay_recipes.demo.trainer.run_steps`, the shared
``replay_recipes.grpo`` objective) on the same right-padded micro-batches, given to the model
with their attention mask. Replay is ``trainer_hooks.hf.RoutingReplay``, built through the
shared switch (``routing_replay`` options with ``trainer: hf``, ``packing: bshd`` = padded);
each micro-batch's forward and backward run inside its own replay pass.

The routing used is measured independently of the hook (:class:`ExpertsMeter`): forward
pre-hooks on every MoE layer's ``experts`` module read the expert ids the sparse block really
hands them and compare them with the rollout's ids laid out for that micro-batch, through the
Megatron hook's ``AgreementCounter`` (native rows counted apart). The model is sharded with
FSDP2 (``fully_shard`` on every decoder layer and the root) over a gloo world of one process:
the demo runs the FSDP2 code path on one CPU; two ranks are exercised by the tests
(``tests/trainer_hooks/hf/test_fsdp2.py``) and on GPUs (``docs/multi-gpu.md``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from .batches import MicroBatch
from .config import TrainConfig
from .mismatch import AgreementMeter
from .trainer import RunResult, run_steps

__all__ = ["ExpertsMeter", "hf_train_run", "hooks_inert_difference", "padding_mask"]

_EXPERTS = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts$")


class ExpertsMeter(AgreementMeter):
    """Forward pre-hooks on each ``layers.N.mlp.experts`` module of a ``transformers`` MoE
    model: the ids each token is really sent to (the experts' ``top_k_index`` argument),
    counted against the rollout's ids; not the replay hook's code or comparison."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], top_k: int) -> None:
        found: list[tuple[int, torch.nn.Module]] = []
        for name, mod in model.named_modules():
            m = _EXPERTS.search(name)
            if m:
                found.append((int(m.group(1)), mod))
        found.sort(key=lambda x: x[0])
        at = tuple(layer for layer, _ in found)
        if at != tuple(layers):
            raise ValueError(f"the model's experts modules are at layers {at}, expected "
                             f"{tuple(layers)}")
        super().__init__(layers, top_k)
        self._hooks = [mod.register_forward_pre_hook(self._hook(i))
                       for i, (_, mod) in enumerate(found)]

    def _hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, args: Any) -> None:
            self._count(index, args[1].detach().long())

        return hook


def padding_mask(mb: MicroBatch) -> torch.Tensor:
    """``int64 [b, L]``: 1 at each sample's tokens (the micro-batch is right-padded)."""
    b, length = mb.tokens.shape
    n = torch.tensor([s.num_tokens for s in mb.samples])
    return (torch.arange(length)[None, :] < n[:, None]).long().expand(b, length).contiguous()


@contextlib.contextmanager
def _fsdp_world() -> Any:
    """A gloo process group of one (an in-memory store, no port) unless one is set up already;
    removed on the way out."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` on every decoder layer, then on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                local_files_only=True)


@torch.no_grad()
def hooks_inert_difference(model_dir: Path, tokens: np.ndarray,
                           source: Mapping[str, RoutedSample], geometry: RoutingGeometry) -> float:
    """``max |logits|`` difference on ``tokens`` between the trainer's model (transformers,
    fp32, the replay hooks attached, outside a pass) and the same checkpoint without hooks:
    the hf trainer holds the engine's weights and the hooks change nothing outside a pass."""
    from trainer_hooks.hf import RoutingReplay

    ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
    model = _load(model_dir).eval()
    plain = model(input_ids=ids).logits.float()
    with RoutingReplay(model, geometry, source=source):
        hooked = model(input_ids=ids).logits.float()
    return float((hooked - plain).abs().max())


def hf_train_run(
    model_dir: Path,
    source: Mapping[str, RoutedSample],
    geometry: RoutingGeometry,
    micro_batches: list[MicroBatch],
    config: TrainConfig,
    *,
    replay: bool,
    temperature: float,
) -> RunResult:
    """:func:`~replay_recipes.demo.trainer.train_run` for a ``transformers`` model: the same
    steps, micro-batches and figures; replay through ``trainer_hooks.hf``; the model sharded
    with FSDP2 over a gloo world of one."""
    t0 = time.perf_counter()
    with _fsdp_world():
        return _train(model_dir, source, geometry, micro_batches, config, replay=replay,
                      temperature=temperature, t0=t0)


def _train(model_dir: Path, source: Mapping[str, RoutedSample], geometry: RoutingGeometry,
           micro_batches: list[MicroBatch], config: TrainConfig, *, replay: bool,
           temperature: float, t0: float) -> RunResult:
    import trainer_hooks
    from trainer_hooks.hf import RoutingReplay

    model = _shard(_load(model_dir))
    options = trainer_hooks.ReplayOptions(enabled=True, trainer="hf", packing="bshd")
    controller: RoutingReplay = trainer_hooks.build_routing_replay(
        options, model, source=source, geometry=geometry)
    meter = ExpertsMeter(model, controller.layers, geometry.top_k)
    result = RunResult(replay=replay, parameters=sum(p.numel() for p in model.parameters()))
    masks = [padding_mask(mb) for mb in micro_batches]
    by_id = {id(mb): m for mb, m in zip(micro_batches, masks)}
    try:
        # Laid out (and, replay on, uploaded) once: every step trains on the same batches.
        routing = ([controller.prepare(mb.samples, attention_mask=m)
                    for mb, m in zip(micro_batches, masks)] if replay else None)
        hosts = ([r.host for r in routing] if routing is not None
                 else [controller.layout(mb.samples, attention_mask=m)
                       for mb, m in zip(micro_batches, masks)])

        def forward(mb: MicroBatch) -> torch.Tensor:
            return model(input_ids=mb.tokens, attention_mask=by_id[id(mb)]).logits

        run_steps(
            model, micro_batches, hosts, meter, config, result,
            forward=forward, temperature=temperature,
            micro_pass=((lambda i: controller.replaying(routing[i])) if routing is not None
                        else (lambda _i: contextlib.nullcontext())),
            router_own=controller.metrics if replay else dict,
        )
    finally:
        meter.close()
        controller.close()
    result.seconds = time.perf_counter() - t0
    return result
