"""The replay controller for Hugging Face ``transformers`` MoE models.

A forward hook on every router module of the model (found once by the family's adapter)
replaces the router's output ``(logits, weights, indices)`` while a pass is active:

- ``indices``: the replayed ids at prompt and completion rows; the router's own ids at pad and
  native rows (``-1`` in the device targets, ``where(target < 0, own, target)``, no host sync);
- ``weights``: the family's normalisation of the router's own ``logits`` at those ids
  (:meth:`FamilyAdapter.combine`), so the gradient reaches the router as natively; the
  router's own weights, untouched, at pad and native rows;
- ``logits``: untouched (what the family's auxiliary loss reads).

Outside a pass the hooks return nothing and the model routes natively. Every call of a router
within a pass (the forward, a second forward of the same batch, the recompute of gradient
checkpointing) replays the same micro-batch's targets; agreement is counted at each router's
first call of a pass only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import HostRouting, LayoutError, lookup_samples
from replay_bridge.sample import RoutedSample
from trainer_hooks.megatron import (
    AgreementCounter,
    ReplayConfigError,
    ReplayStateError,
    flat_figures,
)
from trainer_hooks.upload import upload_routing

from ._families import FamilyAdapter, RouterSite, adapter_for
from ._grid import grid_routing, packed_spans, padded_spans, sequence_slice

__all__ = ["MicroBatchRouting", "RoutingReplay", "model_geometry"]

Layout = Literal["padded", "packed"]
_OWNER = "_replay_bridge_hf_replay"


def _checked_packing(packing: str) -> Layout:
    """``packing`` if it is a layout this hook knows, else ``ValueError``."""
    if packing not in ("padded", "packed"):
        raise ValueError(f"packing must be 'padded' or 'packed', got {packing!r}")
    return cast(Layout, packing)


def model_geometry(model: torch.nn.Module) -> RoutingGeometry:
    """The routing geometry of a ``transformers`` model, read from its config by the library's
    one rule (:meth:`RoutingGeometry.from_hf_config`, :func:`hf_moe_layers`)."""
    config = model.config
    d = config.to_dict()
    if "num_hidden_layers" not in d and getattr(config, "text_config", None) is not None:
        d = config.text_config.to_dict()
    return RoutingGeometry.from_hf_config(d, name=getattr(config, "name_or_path", None) or None)


@dataclass(eq=False)
class MicroBatchRouting:
    """One micro-batch's routing on the device, on the model's ``[batch * seq]`` token grid:
    ``targets`` is ``int64 [routers, batch * seq, top_k]``, ``-1`` at pad and native rows;
    ``replayed`` ``bool [batch * seq, 1]`` marks the rows that take the replayed ids;
    ``region`` ``int64 [batch * seq]`` the layout's region codes."""

    host: HostRouting
    shape: tuple[int, int]
    targets: torch.Tensor
    replayed: torch.Tensor
    region: torch.Tensor
    _staging: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    @property
    def num_tokens(self) -> int:
        return self.host.num_tokens


def _upload(host: HostRouting, shape: tuple[int, int], device: torch.device) -> MicroBatchRouting:
    """``host`` on ``device`` (:func:`~trainer_hooks.upload.upload_routing`): ``-1`` at pad and
    native rows, the other rows marked ``replayed``."""
    up = upload_routing(host, device, fill_pad=True)
    assert up.filled is not None
    replayed = (~up.filled).unsqueeze(1)
    return MicroBatchRouting(host, shape, up.targets, replayed, up.region, up.staging)


@dataclass
class _Pass:
    """One active pass: the micro-batch and what the hook reads of it at every call."""

    mb: MicroBatchRouting
    calls: list[int]
    counter: AgreementCounter | None  # None: agreement not counted in this pass
    tokens: int
    replayed: torch.Tensor
    region: torch.Tensor
    targets: tuple[torch.Tensor, ...]  # one [tokens, top_k] per router


class RoutingReplay:
    """Replays rollout routing in a Hugging Face ``transformers`` MoE model's routers.

    ``model``: the ``transformers`` model (``...ForCausalLM`` or its base model).
    ``geometry``: the geometry the routing was stored with (checked against the model's).
    ``source``: any ``Mapping[str, RoutedSample]`` (a shard reader) for looking samples up by
    id. ``packing``: ``"padded"`` (one sample per batch row, an attention mask) or
    ``"packed"`` (sequences concatenated in rows, ``position_ids`` restarting at 0), the
    default of :meth:`prepare`. Every guard on the model runs here.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        geometry: RoutingGeometry,
        *,
        source: Mapping[str, RoutedSample] | None = None,
        packing: Layout = "padded",
        agreement: bool = True,
        validate_ids: bool = True,
    ) -> None:
        self.model = model
        self.geometry = geometry
        self.source = source
        self.packing: Layout = _checked_packing(packing)
        self.validate_ids = validate_ids
        self.adapter: FamilyAdapter = adapter_for(model.config)
        own = model_geometry(model)
        own.require_same(geometry, "the model's routing geometry and the rollout routing's")
        self._sites = self.adapter.routers(model)
        self._check_sites(own)
        if any(getattr(s.module, _OWNER, None) is not None for s in self._sites):
            raise ReplayConfigError(
                "another RoutingReplay is attached to this model's routers: close() it first"
            )
        self._device = next(self._sites[0].module.parameters()).device
        self._agreement = (
            AgreementCounter(geometry.moe_layers, geometry.top_k, self._device)
            if agreement else None
        )
        self._pass: _Pass | None = None
        self._handles = []
        for i, s in enumerate(self._sites):
            setattr(s.module, _OWNER, self)
            self._handles.append(s.module.register_forward_hook(self._hook_for(i, s)))
        self._closed = False

    # ---- introspection -------------------------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        """Wire layer indices of the model's routers, in the order of the targets."""
        return tuple(s.layer for s in self._sites)

    @property
    def routers(self) -> tuple[str, ...]:
        """Module names of the routers the replay drives."""
        return tuple(s.name for s in self._sites)

    # ---- data ----------------------------------------------------------------------------

    def layout(
        self,
        items: Sequence[RoutedSample | str],
        *,
        attention_mask: Any = None,
        position_ids: Any = None,
        packing: Layout | None = None,
        sp_size: int = 1,
        sp_rank: int = 0,
    ) -> HostRouting:
        """One micro-batch's routing on the model's ``[batch * seq]`` grid, on the host.

        ``items``: samples, or sample ids looked up in ``source``, in batch order (padded: one
        per row; packed: in the order the sequences appear, row by row). Padded needs the
        ``attention_mask`` ``[batch, seq]``; packed needs ``position_ids`` (and takes an
        ``attention_mask`` marking padding, if any). Tensors on a GPU are read back once.

        Ulysses-style sequence parallelism: ``sp_size`` ranks, this one ``sp_rank``; pass the
        whole batch's (unsliced) mask / position ids; the routers of this rank see columns
        ``[sp_rank * seq/sp_size, (sp_rank + 1) * seq/sp_size)`` of every row
        (:func:`~trainer_hooks.hf._grid.sequence_slice`)."""
        return self._layout(items, attention_mask, position_ids, packing, sp_size, sp_rank)[0]

    def prepare(
        self,
        items: Sequence[RoutedSample | str],
        *,
        attention_mask: Any = None,
        position_ids: Any = None,
        packing: Layout | None = None,
        sp_size: int = 1,
        sp_rank: int = 0,
    ) -> MicroBatchRouting:
        """:meth:`layout`, sent to the model's device without waiting."""
        host, shape = self._layout(items, attention_mask, position_ids, packing, sp_size,
                                   sp_rank)
        return _upload(host, shape, self._device)

    def _layout(
        self, items: Sequence[RoutedSample | str], attention_mask: Any, position_ids: Any,
        packing: Layout | None, sp_size: int = 1, sp_rank: int = 0,
    ) -> tuple[HostRouting, tuple[int, int]]:
        if _checked_packing(packing or self.packing) == "padded":
            if attention_mask is None:
                raise LayoutError("a padded micro-batch needs its attention_mask")
            spans = padded_spans(attention_mask)
        else:
            if position_ids is None:
                raise LayoutError("a packed micro-batch needs its position_ids")
            spans = packed_spans(position_ids, attention_mask)
        samples = lookup_samples(items, self.source)
        host = grid_routing(samples, self.geometry, self.layers, spans,
                            validate=self.validate_ids)
        return sequence_slice(host, spans.shape, sp_size, sp_rank)

    # ---- control -------------------------------------------------------------------------

    @contextlib.contextmanager
    def replaying(
        self, micro_batch: MicroBatchRouting, *, measure: bool = True
    ) -> Iterator[RoutingReplay]:
        """One micro-batch's pass: run its forward (and its backward, where gradient
        checkpointing recomputes the routers) inside. ``measure``: count agreement at each
        router's first call (when built with ``agreement=True``)."""
        if self._closed:
            raise ReplayStateError("this RoutingReplay is closed")
        if self._pass is not None:
            raise ReplayStateError("a replay pass is already active")
        for s in self._sites:
            if self._lookup(s.name) is not s.module:
                raise ReplayStateError(
                    f"router at layer {s.layer} ({s.name}) is no longer the module this replay "
                    "hooked (replaced after the RoutingReplay was built): it would route "
                    "natively; build the RoutingReplay after the model is final"
                )
        if micro_batch.host.layers != self.layers:
            raise ReplayStateError(
                f"the micro-batch was laid out for layers {micro_batch.host.layers}, the "
                f"model's routers are at {self.layers}"
            )
        mb = micro_batch
        self._pass = _Pass(mb, [0] * len(self._sites), self._agreement if measure else None,
                           mb.num_tokens, mb.replayed, mb.region, mb.targets.unbind(0))
        try:
            yield self
        finally:
            self._pass = None

    def metrics(self, group: Any = None, reset: bool = True) -> dict[str, float]:
        """Agreement since the last read, under the Megatron hook's flat names
        (``routing_replay/exact``, ``overlap``, ``tokens``, per region and ``layer{i}/``;
        ``native/tokens``). One device read; with ``group`` summed over it."""
        if self._agreement is None:
            return {}
        return flat_figures(self._agreement.read(group, reset=reset))

    def close(self) -> None:
        """Remove every hook; the model routes natively again."""
        if self._closed:
            return
        for h in self._handles:
            h.remove()
        for s in self._sites:
            if getattr(s.module, _OWNER, None) is self:
                delattr(s.module, _OWNER)
        self._pass = None
        self._closed = True

    def __enter__(self) -> RoutingReplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------

    def _lookup(self, name: str) -> torch.nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def _check_sites(self, own: RoutingGeometry) -> None:
        found = tuple(s.layer for s in self._sites)
        if found != own.moe_layers:
            raise ReplayConfigError(
                f"the model's {self.adapter.router_class} routers sit at layers {list(found)}, "
                f"its config routes at {list(own.moe_layers)} (replay_bridge.geometry."
                "hf_moe_layers): the model does not follow its config"
            )
        for s in self._sites:
            k, e = int(s.module.top_k), int(s.module.num_experts)
            if (k, e) != (own.top_k, own.num_experts):
                raise ReplayConfigError(
                    f"router at layer {s.layer} ({s.name}) routes top-{k} of {e} experts, the "
                    f"config says top-{own.top_k} of {own.num_experts}"
                )

    def _hook_for(self, index: int, site: RouterSite) -> Any:
        # Hot path: one call per router per forward (and recompute); everything it reads is
        # bound here or taken from the pass, which holds the micro-batch's tensors.
        combine = self.adapter.combine
        combine_is_own = self.adapter.combine_is_own
        moe_index = self.geometry.moe_layers.index(site.layer)
        where = torch.where
        replay = self

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            p = replay._pass
            if p is None:
                return None
            logits, weights, own = output
            if logits.shape[0] != p.tokens:
                mb = p.mb
                raise ReplayStateError(
                    f"router at layer {site.layer} ({site.name}) sees {logits.shape[0]} tokens, "
                    f"the micro-batch was laid out for {mb.num_tokens} ({mb.shape[0]} x "
                    f"{mb.shape[1]}): the batch passed to the model is not the one prepared"
                )
            replayed = p.replayed
            ids = where(replayed, p.targets[index], own)
            w = combine(module, logits, ids)
            if not combine_is_own(logits):  # else the combine at own ids is `weights`, bit for bit
                w = where(replayed, w, weights)
            calls = p.calls
            calls[index] += 1
            if calls[index] == 1 and p.counter is not None:
                p.counter.add_topk(moe_index, own, ids, p.region)
            return logits, w, ids

        return hook
