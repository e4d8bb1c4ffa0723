"""Rollout-vs-trainer mismatch: the routing the trainer's routers actually used against the
rollout's ids, and the log-prob difference on completion tokens.

Routing: a forward hook on every router reads its routing map (``bool [tokens, experts]``, the
experts each token was actually sent to) and compares it with the rollout's ids laid out for
that micro-batch (:class:`~trainer_hooks.megatron.HostRouting`). A (token, MoE layer) block
agrees when the two sets of k experts are equal; ``overlap`` is ``|used ∩ rollout| / k``.
Only positions that have rollout routing count (pad rows and the last position do not);
native rows (before the sample's ``routed_start``, or marked) are counted apart, as blocks
only.

Log-probs: ``r = logp_trainer - logp_rollout`` over completion tokens; ``k3 = mean(exp(r) - 1 -
r)`` estimates KL(rollout ‖ trainer) from tokens the rollout engine sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trainer_hooks.megatron import AgreementCounter, HostRouting, moe_routers

__all__ = ["AgreementMeter", "RoutingMeter", "logp_mismatch"]


class AgreementMeter:
    """Counts, per MoE layer and region, blocks whose used experts equal the rollout's, in an
    :class:`~trainer_hooks.megatron.AgreementCounter`; subclasses hook the model where the
    experts used can be read (never the replay's own comparison) and call :meth:`_count`.

    Call :meth:`expect` with each micro-batch's laid-out rollout routing before its forward;
    forwards without an expectation (or after :meth:`close`) are not counted.
    """

    def __init__(self, layers: Sequence[int], top_k: int) -> None:
        self.layers = tuple(layers)
        self._counter = AgreementCounter(self.layers, top_k)
        self._ids: torch.Tensor | None = None
        self._region: torch.Tensor | None = None
        self._hooks: list[Any] = []

    @property
    def counts(self) -> torch.Tensor:
        """``int64 [layer, region (prompt, completion, pad, native), (blocks, exact, overlap
        ids)]``."""
        return self._counter.counts

    def expect(self, host: HostRouting) -> None:
        if host.layers != self.layers:
            raise ValueError(f"routing laid out for layers {host.layers}, meter has {self.layers}")
        self._ids = torch.from_numpy(host.ids.astype(np.int64))
        self._region = torch.from_numpy(host.region.astype(np.int64))

    def _count(self, index: int, used: torch.Tensor, routing_map: bool = False) -> None:
        """One call at MoE layer ``index``: ``used`` is the experts the tokens went to, a
        ``bool [tokens, experts]`` routing map or ``int64 [tokens, k]`` ids."""
        if self._ids is None or self._region is None:
            return
        if used.shape[0] != self._ids.shape[0]:
            raise ValueError(f"router {self.layers[index]} saw {used.shape[0]} tokens, "
                             f"the laid-out rollout routing has {self._ids.shape[0]}")
        add = self._counter.add_routing_map if routing_map else self._counter.add_topk
        add(index, used, self._ids[:, index, :], self._region)

    def read(self, reset: bool = True) -> dict[str, Any]:
        """``{"blocks", "exact", "overlap", "prompt": {...}, "completion": {...},
        "layers": {layer: {...}}}`` over positions with rollout routing, and
        ``"native": {"blocks"}``."""
        return self._counter.read(reset=reset)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._ids = self._region = None


class RoutingMeter(AgreementMeter):
    """The megatron-core meter: a forward hook on every router reads its routing map (the
    experts each token was actually sent to)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], top_k: int) -> None:
        routers = moe_routers(model)
        found = tuple(r.layer for r in routers)
        if found != tuple(layers):
            raise ValueError(f"the model's routers are at layers {found}, expected {tuple(layers)}")
        super().__init__(layers, top_k)
        self._hooks = [r.module.register_forward_hook(self._hook(i))
                       for i, r in enumerate(routers)]

    def _hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._count(index, output[1].detach(), routing_map=True)

        return hook


def logp_mismatch(r: np.ndarray) -> dict[str, float]:
    """k3 KL, mean and max ``|r|`` of ``r = logp_trainer - logp_rollout``."""
    r = np.asarray(r, np.float64)
    if r.size == 0:
        return {"tokens": 0, "k3_kl": float("nan"), "mean_abs": float("nan"),
                "max_abs": float("nan")}
    return {"tokens": int(r.size), "k3_kl": float(np.mean(np.expm1(r) - r)),
            "mean_abs": float(np.abs(r).mean()), "max_abs": float(np.abs(r).max())}

