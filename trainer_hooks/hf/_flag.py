"""The shared switch (:mod:`trainer_hooks.options`: ``--routing-replay ...``,
``routing_replay:``) building the ``transformers`` hook, when it says ``trainer: hf``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from trainer_hooks.options import ReplayOptions, replay_source
from trainer_hooks.megatron import ReplayConfigError

from ._replay import RoutingReplay

__all__ = ["build_routing_replay"]


def build_routing_replay(
    options: ReplayOptions,
    model: Any,
    *,
    source: Mapping[str, RoutedSample] | None = None,
    geometry: RoutingGeometry | None = None,
) -> RoutingReplay | None:
    """A :class:`RoutingReplay` for the ``transformers`` ``model`` as ``options`` say
    (``trainer: hf``), or ``None`` when replay is off.

    ``source`` defaults to a ``ShardReader`` over ``options.shards``; ``geometry`` to the
    source's. ``packing`` ``thd`` lays micro-batches out as packed sequences, ``bshd`` as a
    padded batch (:attr:`ReplayOptions.hf_packing`). Every guard runs here; options for
    another trainer are refused."""
    if not options.enabled:
        return None
    if options.trainer != "hf":
        raise ReplayConfigError(
            f"routing_replay.trainer is {options.trainer!r}: build it with "
            f"trainer_hooks.{options.trainer}.build_routing_replay (or "
            "trainer_hooks.build_routing_replay, which picks the hook), not the hf one"
        )
    source, geometry = replay_source(options, source, geometry)
    return RoutingReplay(model, geometry, source=source, packing=options.hf_packing,
                         agreement=options.agreement, validate_ids=options.validate_ids)
