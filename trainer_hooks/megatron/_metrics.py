"""Agreement between each router's own top-k and the replayed top-k, accumulated on the device.

Per MoE layer and region (prompt / completion positions; pad rows are not counted): tokens,
blocks whose own top-k *set* equals the replayed set, and the summed overlap
``|own ∩ replayed|``. Accumulation is a few device kernels per router call and never reads a
value back; :meth:`Agreement.read` does, once, when the trainer logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._layout import COMPLETION, PROMPT

__all__ = ["Agreement"]

_TOKENS, _EXACT, _OVERLAP = 0, 1, 2
_REGIONS = {"prompt": PROMPT, "completion": COMPLETION}


class Agreement:
    """Device accumulators ``int64 [num_moe_layers, 3 regions, 3 counts]``."""

    def __init__(self, moe_layers: Sequence[int], top_k: int, device: torch.device) -> None:
        self.moe_layers = tuple(moe_layers)
        self.top_k = top_k
        self.counts = torch.zeros(len(self.moe_layers), 3, 3, dtype=torch.int64, device=device)

    def add(
        self, moe_index: int, own: torch.Tensor, replayed: torch.Tensor, region: torch.Tensor
    ) -> None:
        """Count one router call: ``own`` and ``replayed`` are ``[tokens, k]`` expert ids,
        ``region`` ``int64 [tokens]``."""
        overlap = (own.unsqueeze(-1) == replayed.unsqueeze(-2)).any(-1).sum(-1)
        stats = torch.stack(
            (torch.ones_like(overlap), (overlap == self.top_k).long(), overlap.long()), dim=1
        )
        self.counts[moe_index].index_add_(0, region, stats)

    def reset(self) -> None:
        self.counts.zero_()

    def read(self, group: Any = None, prefix: str = "routing_replay/") -> dict[str, float]:
        """The figures as a flat dict (one device-to-host read). With a process ``group``, every
        rank of it must call: counts are summed over the group first."""
        counts = self.counts
        if group is not None:
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=group)
        c = counts.cpu().double()
        k = float(self.top_k)
        out: dict[str, float] = {}

        def put(name: str, block: torch.Tensor) -> None:
            tokens = float(block[..., _TOKENS].sum())
            out[f"{prefix}{name}tokens"] = tokens
            if tokens:
                out[f"{prefix}{name}exact"] = float(block[..., _EXACT].sum()) / tokens
                out[f"{prefix}{name}overlap"] = float(block[..., _OVERLAP].sum()) / (tokens * k)

        data = c[:, [PROMPT, COMPLETION], :]
        put("", data)
        for region, r in _REGIONS.items():
            put(f"{region}/", c[:, r, :])
        for i, layer in enumerate(self.moe_layers):
            if data[i, :, _TOKENS].sum():
                put(f"layer{layer}/", data[i])
        return out
