"""The replay controller: targets per micro-batch, backward replay, native rows, agreement,
clean passes.

It drives megatron-core's own ``RouterReplay`` objects, one per local router, found by walking
the model (never by position in megatron's process-wide instance list). All state lives on the
:class:`RoutingReplay` object the trainer owns; :meth:`RoutingReplay.close` removes every trace.

Native rows (region :data:`~replay_bridge.layout.NATIVE`: no rollout routing) hold ``-1`` in
the device targets; for a micro-batch that has any, the router's top-k step takes its own
top-k there and the replayed ids elsewhere, per row, without a host sync.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import (
    HostRouting,
    Packing,
    RankSlice,
    layout_routing,
    lookup_samples,
)
from replay_bridge.sample import RoutedSample
from trainer_hooks.upload import upload_routing

from ._metrics import AgreementCounter, flat_figures
from ._routers import ReplayConfigError, RouterSlot, find_routers

__all__ = ["MicroBatchRouting", "ReplayStateError", "RoutingReplay"]


class ReplayStateError(RuntimeError):
    """Replay used out of order: more forwards than micro-batches, a router without a target,
    a target whose token count differs from the router's input."""


@dataclass(eq=False)
class MicroBatchRouting:
    """One micro-batch's routing on the device: ``targets[i]`` is ``int64 [tokens, top_k]`` for
    this rank's ``i``-th router (views of one contiguous ``[routers, tokens, top_k]`` tensor),
    ``-1`` at native tokens."""

    host: HostRouting
    ids: torch.Tensor
    region: torch.Tensor
    targets: list[torch.Tensor]
    has_native: bool = False
    """Some token routes natively (known on the host when laid out)."""
    _staging: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    @property
    def num_tokens(self) -> int:
        return self.host.num_tokens


def _upload(host: HostRouting, device: torch.device) -> MicroBatchRouting:
    """``host`` on ``device`` (:func:`~trainer_hooks.upload.upload_routing`): ``-1`` at native
    tokens, one target view per router."""
    up = upload_routing(host, device)
    return MicroBatchRouting(host, up.targets, up.region, list(up.targets.unbind(0)),
                             up.filled is not None, up.staging)


@dataclass
class _Pass:
    micro_batches: list[MicroBatchRouting]
    forward_only: bool
    measure: bool = True
    forwards: dict[int, int] = field(default_factory=dict)
    native_targets: frozenset[int] = frozenset()
    """``id()`` of the targets of micro-batches with native tokens."""


class RoutingReplay:
    """Replays rollout routing in a megatron-core model's routers.

    ``model``: the model chunk, or the list of chunks passed to Megatron's schedules (virtual
    pipeline). ``geometry``: the geometry the routing was stored with. ``source``: any
    ``Mapping[str, RoutedSample]`` (a shard reader) for looking samples up by id. Every guard
    runs here, before the first step.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        geometry: RoutingGeometry,
        *,
        source: Mapping[str, RoutedSample] | None = None,
        packing: Packing | None = None,
        rank: RankSlice | None = None,
        agreement: bool = True,
        validate_ids: bool = True,
        allow_token_dropping: bool = False,
    ) -> None:
        self._chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.geometry = geometry
        self.source = source
        self.packing = packing
        self.validate_ids = validate_ids
        self._slots, self.config = find_routers(self._chunks, geometry, allow_token_dropping)
        if any("get_replay_topk" in vars(s.replay) for s in self._slots):
            raise ReplayConfigError(
                "another RoutingReplay is attached to this model's routers: close() it first"
            )
        self.rank = rank if rank is not None else _megatron_rank(self.config)
        self._device = self._slots[0].router.weight.device
        self._by_chunk: dict[int, list[RouterSlot]] = {}
        for s in self._slots:
            self._by_chunk.setdefault(s.chunk, []).append(s)
        self._agreement = (
            AgreementCounter(geometry.moe_layers, geometry.top_k, self._device)
            if agreement else None
        )
        self._pass: _Pass | None = None
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._fwd, self._bwd = RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD
        for s in self._slots:
            s.replay.get_replay_topk = self._topk_for(s)
        self._closed = False

    # ---- introspection -------------------------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        """Wire layer indices of this rank's routers, in the order of a micro-batch's targets."""
        return tuple(s.layer for s in self._slots)

    @property
    def routers(self) -> tuple[str, ...]:
        """Module names of this rank's routers (chunk-relative)."""
        return tuple(f"chunk{s.chunk}:{s.name}" for s in self._slots)

    # ---- data ----------------------------------------------------------------------------

    def layout(
        self,
        items: Sequence[RoutedSample | str],
        packing: Packing | None = None,
        *,
        seq_lengths: Sequence[int] | None = None,
    ) -> HostRouting:
        """This rank's routing for one micro-batch, on the host (see :func:`layout_routing`)."""
        packing = packing or self.packing
        if packing is None:
            raise ValueError("no packing given (pass one here or to RoutingReplay)")
        samples = lookup_samples(items, self.source)
        return layout_routing(
            samples, self.geometry, packing, self.rank, self.layers, seq_lengths,
            validate=self.validate_ids,
        )

    def prepare(
        self,
        items: Sequence[RoutedSample | str],
        packing: Packing | None = None,
        *,
        seq_lengths: Sequence[int] | None = None,
    ) -> MicroBatchRouting:
        """Lay out one micro-batch (samples, or sample ids looked up in ``source``, in the order
        the trainer packs them) and send it to the device without waiting."""
        return _upload(self.layout(items, packing, seq_lengths=seq_lengths), self._device)

    # ---- control -------------------------------------------------------------------------

    @contextlib.contextmanager
    def replaying(
        self,
        micro_batches: Sequence[MicroBatchRouting],
        *,
        forward_only: bool = False,
        measure: bool = True,
    ) -> Iterator[RoutingReplay]:
        """One pass (a log-prob pass with ``forward_only=True``, or a training step) over
        ``micro_batches`` in schedule order. Forwards of each model chunk take them in turn;
        on exit every router's targets, backward queue and action are cleared. ``measure``:
        count agreement in this pass (when the replay was built with ``agreement=True``)."""
        if self._closed:
            raise ReplayStateError("this RoutingReplay is closed")
        if self._pass is not None:
            raise ReplayStateError("a replay pass is already active")
        for s in self._slots:
            if getattr(s.router, "router_replay", None) is not s.replay:
                raise ReplayStateError(
                    f"router at layer {s.layer} ({s.name}) holds another RouterReplay than the "
                    "one this replay drives (replaced after the RoutingReplay was built): it "
                    "would route natively; build the RoutingReplay after the model is final"
                )
        for i, mb in enumerate(micro_batches):
            if mb.host.layers != self.layers:
                raise ReplayStateError(
                    f"micro-batch {i} was laid out for layers {mb.host.layers}, this rank's "
                    f"routers are at {self.layers}"
                )
        native = frozenset(id(t) for mb in micro_batches if mb.has_native for t in mb.targets)
        self._pass = _Pass(list(micro_batches), forward_only, measure, native_targets=native)
        try:
            yield self
        finally:
            self._pass = None
            self._clear()

    def wrap_forward_step(self, forward_step: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a Megatron ``forward_step_func(data_iterator, model, ...)``: before each forward
        the chunk's routers get the next micro-batch's targets; when that micro-batch's backward
        starts they switch to backward replay (activation recompute pops them in order).
        Outside :meth:`replaying` it calls ``forward_step`` unchanged (native routing)."""

        @functools.wraps(forward_step)
        def wrapped(data_iterator: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            p = self._pass
            if p is None:
                return forward_step(data_iterator, model, *args, **kwargs)
            chunk = self._chunk_of(model)
            mb = self._begin_forward(p, chunk)
            result = forward_step(data_iterator, model, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            if (not p.forward_only and isinstance(out, torch.Tensor) and out.requires_grad):
                out.register_hook(functools.partial(self._begin_backward, chunk, mb))
            return result

        return wrapped

    def metrics(self, group: Any = None, reset: bool = True) -> dict[str, float]:
        """Agreement since the last read: ``routing_replay/exact`` (fraction of (token, layer)
        blocks whose own top-k set equals the replayed one), ``routing_replay/overlap`` (mean
        ``|own ∩ replayed| / k``), the same under ``prompt/``, ``completion/`` and
        ``layer{i}/``, and token counts; ``native/tokens`` counts natively routed blocks
        apart. One device read; with ``group`` summed over it."""
        if self._agreement is None:
            return {}
        return flat_figures(self._agreement.read(group, reset=reset))

    def close(self) -> None:
        """Clear every router's replay state and remove this object's hooks."""
        if self._closed:
            return
        self._clear()
        for s in self._slots:
            s.replay.__dict__.pop("get_replay_topk", None)
        self._closed = True

    def __enter__(self) -> RoutingReplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------

    def _chunk_of(self, model: torch.nn.Module) -> int:
        for i, c in enumerate(self._chunks):
            if c is model:
                return i
        if len(self._chunks) == 1:
            return 0
        raise ReplayStateError(
            "forward_step was called with a model chunk this replay does not know"
        )

    def _begin_forward(self, p: _Pass, chunk: int) -> MicroBatchRouting:
        i = p.forwards.get(chunk, 0)
        if i >= len(p.micro_batches):
            raise ReplayStateError(
                f"forward {i + 1} of model chunk {chunk} but the pass has "
                f"{len(p.micro_batches)} micro-batches"
            )
        p.forwards[chunk] = i + 1
        mb = p.micro_batches[i]
        for s in self._by_chunk.get(chunk, ()):
            s.replay.set_target_indices(mb.targets[s.local_index])
            if p.forward_only:
                s.replay.replay_backward_list.clear()
            s.replay.set_router_replay_action(self._fwd)
            s.region = mb.region if p.measure else None
        return mb

    def _begin_backward(self, chunk: int, mb: MicroBatchRouting, grad: torch.Tensor) -> None:
        for s in self._by_chunk.get(chunk, ()):
            t = mb.targets[s.local_index]
            queue = s.replay.replay_backward_list
            # Routers that were not recomputed for earlier micro-batches left their targets
            # queued; drop them so recompute of this micro-batch pops its own.
            if any(x is t for x in queue):
                while queue[0] is not t:
                    queue.pop(0)
            s.replay.set_router_replay_action(self._bwd)
        return None

    def _clear(self) -> None:
        for s in self._slots:
            s.replay.clear_indices()
            s.replay.clear_router_replay_action()
            s.region = None

    def _topk_for(self, slot: RouterSlot) -> Callable[..., Any]:
        inst = slot.replay
        megatron_topk = type(inst).get_replay_topk
        fwd, bwd = self._fwd, self._bwd

        def get_replay_topk(
            scores: torch.Tensor,
            topk: int,
            num_groups: int | None = None,
            group_topk: int | None = None,
            default_compute_topk: Callable[..., Any] | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            action = inst.router_replay_action
            if action is fwd or action is bwd:
                queue = inst.replay_backward_list
                target = inst.target_topk_idx if action is fwd else (queue[0] if queue else None)
                if target is None:
                    raise ReplayStateError(
                        f"router at layer {slot.layer} ({slot.name}) is set to "
                        f"{action.value} but has no target indices"
                    )
                if tuple(target.shape) != (scores.shape[0], topk):
                    raise ReplayStateError(
                        f"router at layer {slot.layer} ({slot.name}) sees {scores.shape[0]} "
                        f"tokens, top-{topk}; its replay target is {tuple(target.shape)}: the "
                        "micro-batch layout (packing, sequence/context parallel) does not match "
                        "the model's input"
                    )
                p = self._pass
                if p is not None and id(target) in p.native_targets:
                    if action is bwd:
                        queue.pop(0)  # as megatron's backward replay does
                    with torch.no_grad():
                        _, own = default_compute_topk(
                            scores, topk, num_groups=num_groups, group_topk=group_topk
                        )
                    idx = torch.where(target < 0, own, target)
                    probs = scores.gather(1, idx)
                    if action is fwd and self._agreement is not None and slot.region is not None:
                        self._agreement.add_topk(slot.moe_index, own, idx, slot.region)
                    return probs, idx
            probs, idx = megatron_topk(
                inst, scores, topk, num_groups, group_topk, default_compute_topk
            )
            if action is fwd and self._agreement is not None and slot.region is not None:
                with torch.no_grad():
                    _, own = default_compute_topk(
                        scores.detach(), topk, num_groups=num_groups, group_topk=group_topk
                    )
                    self._agreement.add_topk(slot.moe_index, own, idx, slot.region)
            return probs, idx

        return get_replay_topk


def _megatron_rank(config: Any) -> RankSlice:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return RankSlice()
    return RankSlice(
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
    )
