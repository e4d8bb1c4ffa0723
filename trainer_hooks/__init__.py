"""Trainer-side hooks that replay rollout routing: ``trainer_hooks.megatron`` (megatron-core)
and ``trainer_hooks.hf`` (Hugging Face ``transformers``).

One switch selects either: :class:`ReplayOptions` from ``--routing-replay ...``
(:func:`add_routing_replay_args`, :func:`options_from_args`) or a config's ``routing_replay:``
section (:func:`options_from_config`), whose ``trainer`` (``megatron`` by default, or ``hf``)
names the hook :func:`build_routing_replay` builds. The framework packages are imported only
when a hook is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .options import (
    TRAINERS,
    ReplayOptions,
    add_routing_replay_args,
    args_from_options,
    options_from_args,
    options_from_config,
)

__all__ = [
    "TRAINERS",
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
    source: Mapping[str, Any] | None = None,
    geometry: Any = None,
) -> Any:
    """The hook ``options.trainer`` names (``trainer_hooks.megatron.RoutingReplay`` or
    ``trainer_hooks.hf.RoutingReplay``) built over ``model``, or ``None`` when replay is off.
    ``source`` defaults to a ``ShardReader`` over ``options.shards``, ``geometry`` to the
    source's; every guard of that hook runs here."""
    if not options.enabled:
        return None
    if options.trainer == "hf":
        from .hf import build_routing_replay as build
    else:
        from .megatron import build_routing_replay as build
    return build(options, model, source=source, geometry=geometry)
