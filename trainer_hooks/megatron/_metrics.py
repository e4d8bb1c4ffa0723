"""Routing agreement counted per MoE layer and region, without reading a value back.

:class:`AgreementCounter` is the one counting core: per (token, MoE layer) block it adds one
block, whether the two expert sets are equal (``exact``) and the size of their overlap, into
``int64 [layers, 4 regions, 3 counts]`` accumulators on the device, by the layout's region
codes. Pad rows (:data:`PAD`) are counted apart and never reported; native rows
(:data:`NATIVE`, routed with the router's own top-k) are counted apart and reported as a block
count only. ``exact`` and ``overlap`` cover prompt and completion rows. Two comparisons feed
it:

- :meth:`AgreementCounter.add_topk`: ``[tokens, k]`` ids against ``[tokens, k]`` ids (the
  replay's own top-k against the replayed top-k);
- :meth:`AgreementCounter.add_routing_map`: a router's routing map ``bool [tokens, experts]``
  (the experts a token was actually sent to) against ``[tokens, k]`` ids.

Adding is a few device kernels and never synchronises; :meth:`AgreementCounter.read` reads the
counts once, when the trainer logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from replay_bridge.layout import COMPLETION, NATIVE, PROMPT

__all__ = ["AgreementCounter", "flat_figures"]

_BLOCKS, _EXACT, _OVERLAP = 0, 1, 2
_REGIONS = {"prompt": PROMPT, "completion": COMPLETION}
_NUM_REGIONS = 4  # PROMPT, COMPLETION, PAD, NATIVE


class AgreementCounter:
    """Accumulators ``int64 [len(layers), 4 regions, 3 counts (blocks, exact, overlap ids)]``
    (regions: the layout's codes :data:`PROMPT`, :data:`COMPLETION`, :data:`PAD`,
    :data:`NATIVE`).

    ``layers``: the wire layer index of each accumulator row (the ``index`` passed to the
    ``add`` methods is a row, not a layer).
    """

    def __init__(
        self, layers: Sequence[int], top_k: int, device: torch.device | str | None = None
    ) -> None:
        self.layers = tuple(int(layer) for layer in layers)
        self.top_k = int(top_k)
        self.counts = torch.zeros(len(self.layers), _NUM_REGIONS, 3, dtype=torch.int64,
                                  device=device)
        # Per-call host work: a view per layer row, and a ones column kept between calls of
        # the same token count (each op is a launch, and the hooks run it at every router).
        self._rows = self.counts.unbind(0)
        self._ones = torch.ones(0, dtype=torch.int64, device=device)

    def add(
        self, index: int, overlap: torch.Tensor, region: torch.Tensor,
        exact: torch.Tensor | None = None,
    ) -> None:
        """Count one router call: ``overlap`` ``[tokens]`` ids in common, ``region``
        ``int64 [tokens]``, ``exact`` ``bool [tokens]`` (default: ``overlap == top_k``)."""
        if exact is None:
            exact = overlap == self.top_k
        ones = self._ones
        if ones.shape[0] != overlap.shape[0]:
            ones = self._ones = torch.ones(overlap.shape[0], dtype=torch.int64,
                                           device=self.counts.device)
        stats = torch.stack((ones, exact, overlap), dim=1)  # promoted: int64 for int64 overlap
        if stats.dtype != torch.int64:
            stats = stats.long()
        self._rows[index].index_add_(0, region, stats)

    def add_topk(
        self, index: int, ids: torch.Tensor, reference: torch.Tensor, region: torch.Tensor
    ) -> None:
        """``ids`` and ``reference`` are ``[tokens, k]`` expert ids, distinct within a row."""
        overlap = (ids.unsqueeze(-1) == reference.unsqueeze(-2)).any(-1).sum(-1)
        self.add(index, overlap, region)

    def add_routing_map(
        self, index: int, routing_map: torch.Tensor, reference: torch.Tensor,
        region: torch.Tensor,
    ) -> None:
        """``routing_map`` ``bool [tokens, experts]``, ``reference`` ``int64 [tokens, k]``: a
        block is exact when the token went to exactly the k reference experts."""
        used = routing_map.to(torch.bool)
        overlap = used.gather(1, reference).sum(1)
        exact = (overlap == self.top_k) & (used.sum(1) == self.top_k)
        self.add(index, overlap, region, exact)

    def reset(self) -> None:
        self.counts.zero_()

    def read(self, group: Any = None, reset: bool = False) -> dict[str, Any]:
        """``{"blocks", "exact", "overlap", "prompt": {...}, "completion": {...},
        "layers": {layer: {...}}, "native": {"blocks"}}`` over prompt and completion blocks
        (``exact`` and ``overlap`` are NaN where nothing was counted); native blocks are only
        counted. One device-to-host read; with a process ``group`` (every rank of it must call)
        the counts are summed over it first."""
        counts = self.counts
        if group is not None:
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=group)
        c = counts.cpu().double()
        if reset:
            self.reset()
        k = float(self.top_k)

        def figures(block: torch.Tensor) -> dict[str, Any]:
            n = float(block[..., _BLOCKS].sum())
            return {"blocks": int(n),
                    "exact": float(block[..., _EXACT].sum()) / n if n else float("nan"),
                    "overlap": float(block[..., _OVERLAP].sum()) / (n * k) if n else float("nan")}

        data = c[:, [PROMPT, COMPLETION], :]
        out: dict[str, Any] = figures(data)
        for name, r in _REGIONS.items():
            out[name] = figures(c[:, r, :])
        out["layers"] = {layer: figures(data[i]) for i, layer in enumerate(self.layers)}
        out["native"] = {"blocks": int(c[:, NATIVE, _BLOCKS].sum())}
        return out


def flat_figures(figures: dict[str, Any], prefix: str = "routing_replay/") -> dict[str, float]:
    """:meth:`AgreementCounter.read` as a flat log dict: ``{prefix}tokens``, ``exact``,
    ``overlap``, the same under ``prompt/``, ``completion/`` and ``layer{i}/``; ratios only
    where blocks were counted, layers only when they have blocks; ``native/tokens`` (blocks
    routed natively, never compared)."""
    out: dict[str, float] = {}

    def put(name: str, f: dict[str, Any]) -> None:
        out[f"{prefix}{name}tokens"] = float(f["blocks"])
        if f["blocks"]:
            out[f"{prefix}{name}exact"] = f["exact"]
            out[f"{prefix}{name}overlap"] = f["overlap"]

    put("", figures)
    for region in _REGIONS:
        put(f"{region}/", figures[region])
    for layer, f in figures["layers"].items():
        if f["blocks"]:
            put(f"layer{layer}/", f)
    out[f"{prefix}native/tokens"] = float(figures["native"]["blocks"])
    return out
