"""Find a model's local MoE routers and refuse configurations where replay cannot be exact.

Only the model's own modules are looked at, never megatron-core's process-wide ``RouterReplay``
list: routers of other models in the process are not this replay's concern and route natively.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from replay_bridge.geometry import RoutingGeometry

__all__ = [
    "MoERouter",
    "ReplayConfigError",
    "RouterSlot",
    "find_routers",
    "model_geometry",
    "moe_routers",
]


class ReplayConfigError(RuntimeError):
    """A model or configuration under which routing replay would be wrong or silently off."""


@dataclass(eq=False)
class RouterSlot:
    """One local router: its model chunk, wire layer index and megatron ``RouterReplay``."""

    chunk: int
    layer: int
    """Wire (0-based, global) layer index."""
    moe_index: int
    """Position of ``layer`` in the geometry's ``moe_layers``."""
    local_index: int
    """Position among this rank's routers (the layer axis of a micro-batch's ids)."""
    name: str
    router: torch.nn.Module
    replay: Any
    region: torch.Tensor | None = field(default=None, repr=False)


def _is_mtp(name: str) -> bool:
    return "mtp" in name.split(".")


@dataclass(frozen=True, eq=False)
class MoERouter:
    """A megatron-core ``TopKRouter`` found in a model chunk."""

    chunk: int
    layer: int
    """Wire (0-based, global) layer index: the router's ``layer_number - 1`` (-1 for a router
    that no transformer layer numbered)."""
    name: str
    """Module name, relative to its chunk."""
    module: torch.nn.Module
    mtp: bool = False
    """A multi-token-prediction router (no rollout routing: never replayed or measured)."""


def _wire_layer(router: torch.nn.Module) -> int:
    return -1 if router.layer_number is None else int(router.layer_number) - 1


def moe_routers(
    model: torch.nn.Module | Sequence[torch.nn.Module], *, mtp: bool = False
) -> list[MoERouter]:
    """Every ``TopKRouter`` of a model (one chunk, or the list of a virtual pipeline's chunks),
    found by walking the modules, by chunk then layer. Multi-token-prediction routers only
    with ``mtp=True``."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = [
        MoERouter(c, _wire_layer(mod), name, mod, _is_mtp(name))
        for c, chunk in enumerate(chunks)
        for name, mod in chunk.named_modules()
        if isinstance(mod, TopKRouter) and (mtp or not _is_mtp(name))
    ]
    return sorted(out, key=lambda r: (r.chunk, r.mtp, r.layer))


def model_geometry(config: Any) -> RoutingGeometry:
    """The routing geometry a megatron ``TransformerConfig`` describes (``moe_layer_freq`` as an
    int or a 0/1 list; multi-token-prediction layers are not on the wire)."""
    n = int(config.num_layers)
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        moe = tuple(i for i in range(n) if i % freq == 0)
    else:
        pattern = list(freq)
        if len(pattern) != n:
            raise ReplayConfigError(
                f"moe_layer_freq has {len(pattern)} entries for {n} layers: {pattern}"
            )
        moe = tuple(i for i, f in enumerate(pattern) if f)
    if not config.num_moe_experts:
        raise ReplayConfigError("the model config has no num_moe_experts: not an MoE model")
    return RoutingGeometry(n, moe, int(config.moe_router_topk), int(config.num_moe_experts))


def _check_config(config: Any, allow_token_dropping: bool) -> None:
    if not getattr(config, "moe_enable_routing_replay", False):
        raise ReplayConfigError(
            "routing replay is not enabled in the model config: build the model with "
            "TransformerConfig(moe_enable_routing_replay=True) (--moe-enable-routing-replay); "
            "without it the routers have no RouterReplay and route natively"
        )
    if getattr(config, "moe_router_fusion", False):
        raise ReplayConfigError(
            "moe_router_fusion=True: megatron-core's fused top-k path returns before router "
            "replay, so replay would silently do nothing; set moe_router_fusion=False"
        )
    if getattr(config, "moe_expert_capacity_factor", None) is not None and not allow_token_dropping:
        raise ReplayConfigError(
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor}: token dropping "
            "still applies after replay, so replayed routes can be dropped; unset it, or pass "
            "allow_token_dropping=True to accept inexact replay"
        )
    if getattr(config, "moe_router_load_balancing_type", "aux_loss") == "sinkhorn":
        raise ReplayConfigError("sinkhorn routing bypasses router replay")


def _chunk_mismatch(
    c: int, layers: set[int], expected: list[int], here: list[MoERouter]
) -> str | None:
    """Why chunk ``c``'s routers are not one per MoE layer of the geometry there (or None)."""
    got = [r.layer for r in here]
    if got == expected:
        return None
    why = []
    for layer in sorted(set(got) | set(expected)):
        names = [r.name for r in here if r.layer == layer]
        if not names:
            why.append(f"MoE layer {layer} has no router")
        elif layer < 0:
            why.append(f"router {', '.join(names)} has no layer number (it is in no "
                       "transformer layer)")
        elif layer not in expected:
            where = ("a dense layer in the geometry" if layer in layers
                     else "no transformer layer of this chunk")
            why.append(f"router {', '.join(names)} is at layer {layer}, {where}")
        elif len(names) > 1:
            why.append(f"layer {layer} has {len(names)} routers ({', '.join(names)}): "
                       "only one of them can be replayed")
    return (
        f"model chunk {c} on this rank holds layers {sorted(layers)} with routers at {got}, "
        f"but the geometry's MoE layers there are {expected} ({len(got)} routers, expected "
        f"{len(expected)}): " + "; ".join(why)
    )


def _check_replay_holders(chunks: Sequence[torch.nn.Module], slots: list[RouterSlot]) -> None:
    """Every ``RouterReplay`` in the model's chunks belongs to one replayed router, or to a
    multi-token-prediction router; anything else would route natively (or replay another
    router's targets) inside the replayed model."""
    ours = {id(s.router) for s in slots}
    holders: dict[int, list[str]] = {}
    for c, chunk in enumerate(chunks):
        for name, mod in chunk.named_modules():
            rr = getattr(mod, "router_replay", None)
            if rr is None:
                continue
            where = f"chunk{c}:{name}"
            if id(mod) not in ours and not _is_mtp(name):
                raise ReplayConfigError(
                    f"{where} ({type(mod).__name__}) holds a RouterReplay but is not one of the "
                    "routers this replay controls (one TopKRouter per MoE layer of the decoder): "
                    "it would route natively inside the replayed model"
                )
            holders.setdefault(id(rr), []).append(where)
    for names in holders.values():
        if len(names) > 1:
            raise ReplayConfigError(
                f"routers {', '.join(names)} share one RouterReplay instance: each would replay "
                "the targets set last"
            )


def find_routers(
    chunks: Sequence[torch.nn.Module],
    geometry: RoutingGeometry,
    allow_token_dropping: bool = False,
) -> tuple[list[RouterSlot], Any]:
    """This rank's replayable routers in layer order, after every guard; and the model config.

    Multi-token-prediction routers are left out (they have no rollout routing). Only the
    modules of ``chunks`` are looked at: other models in the process (a reference or teacher
    model, a decoder a builder made and dropped) keep routing natively, whatever megatron's
    process-wide ``RouterReplay`` list holds. Raises :class:`ReplayConfigError` or
    ``GeometryMismatch`` naming what is wrong.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    routers = moe_routers(chunks, mtp=True)
    if not routers:
        raise ReplayConfigError("the model has no MoE router (TopKRouter) on this rank")
    config = routers[-1].module.config
    _check_config(config, allow_token_dropping)
    geometry.require_same(model_geometry(config), "the routing shards and the model")

    slots: list[RouterSlot] = []
    moe_pos = {l: i for i, l in enumerate(geometry.moe_layers)}
    for c, chunk in enumerate(chunks):
        layers = {int(mod.layer_number) - 1 for name, mod in chunk.named_modules()
                  if isinstance(mod, TransformerLayer) and not _is_mtp(name)}
        expected = sorted(l for l in layers if l in moe_pos)
        here = [r for r in routers if r.chunk == c and not r.mtp]
        why = _chunk_mismatch(c, layers, expected, here)
        if why:
            raise ReplayConfigError(why)
        for r in here:
            if r.module.router_replay is None:
                raise ReplayConfigError(f"router chunk{c}:{r.name} has no RouterReplay")
            slots.append(RouterSlot(c, r.layer, moe_pos[r.layer], len(slots), r.name, r.module,
                                    r.module.router_replay))
    if not slots:
        raise ReplayConfigError("no MoE layer of the geometry is built on this rank")
    _check_replay_holders(chunks, slots)
    return slots, config
