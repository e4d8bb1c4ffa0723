"""One switch for trainers: ``--routing-replay`` (argparse) or ``routing_replay:`` (YAML).

The options are parsed in :mod:`trainer_hooks.options` (shared with the ``transformers`` hook)
and re-exported here; this module builds the megatron-core hook from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from trainer_hooks.options import (
    ReplayOptions,
    add_routing_replay_args,
    args_from_options,
    options_from_args,
    options_from_config,
    replay_source,
)

from ._replay import RoutingReplay
from ._routers import ReplayConfigError

__all__ = [
    "ReplayOptions",
    "add_routing_replay_args",
    "args_from_options",
    "build_routing_replay",
    "options_from_args",
    "options_from_config",
]


def build_routing_replay(
    options: ReplayOptions,
    model: Any,
    *,
    source: Mapping[str, RoutedSample] | None = None,
    geometry: RoutingGeometry | None = None,
) -> RoutingReplay | None:
    """A :class:`RoutingReplay` for ``model`` as ``options`` say, or ``None`` when replay is off.

    ``source`` defaults to a ``ShardReader`` over ``options.shards``; ``geometry`` to the
    source's. Every guard runs here. Options for another trainer (``trainer: hf``) are
    refused: :func:`trainer_hooks.build_routing_replay` picks the hook they name.
    """
    if not options.enabled:
        return None
    if options.trainer != "megatron":
        raise ReplayConfigError(
            f"routing_replay.trainer is {options.trainer!r}: build it with "
            f"trainer_hooks.{options.trainer}.build_routing_replay (or "
            "trainer_hooks.build_routing_replay, which picks the hook), not the megatron one"
        )
    source, geometry = replay_source(options, source, geometry)
    replay = RoutingReplay(
        model, geometry, source=source, agreement=options.agreement,
        validate_ids=options.validate_ids, allow_token_dropping=options.allow_token_dropping,
    )
    r = replay.rank
    replay.packing = options.packing_for(r.tp_size, r.cp_size, r.sequence_parallel)
    return replay
