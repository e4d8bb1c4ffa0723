"""Megatron-core router replay hook: rollout routing replayed exactly in every parallel layout.

Build a :class:`RoutingReplay` over the model (every guard runs there), lay out each
micro-batch with :meth:`RoutingReplay.prepare`, wrap the forward step once, and run each pass
inside :meth:`RoutingReplay.replaying`::

    replay = RoutingReplay(model_chunks, reader.geometry, source=reader, packing=Packing.thd(2))
    forward_step = replay.wrap_forward_step(forward_step)
    mbs = [replay.prepare(ids) for ids in micro_batch_sample_ids]
    with replay.replaying(mbs):
        forward_backward_func(forward_step_func=forward_step, ..., num_microbatches=len(mbs))
    log(replay.metrics())

``cpu_compat`` (CPU shims for tests) is not imported here and is never needed at runtime.
The layout names (``Packing``, ``RankSlice``, ``layout_routing``, ``HostRouting``, region codes,
``LayoutError``, ``MissingSample``) live in the library (:mod:`replay_bridge.layout`) and are
re-exported here.
"""

from replay_bridge.layout import (
    COMPLETION,
    NATIVE,
    PAD,
    PROMPT,
    HostRouting,
    LayoutError,
    MissingSample,
    Packing,
    RankSlice,
    layout_routing,
)

from ._flag import (
    ReplayOptions,
    add_routing_replay_args,
    args_from_options,
    build_routing_replay,
    options_from_args,
    options_from_config,
)
from ._metrics import AgreementCounter, flat_figures
from ._replay import MicroBatchRouting, ReplayStateError, RoutingReplay
from ._routers import MoERouter, ReplayConfigError, model_geometry, moe_routers

__all__ = [
    "AgreementCounter",
    "COMPLETION",
    "NATIVE",
    "PAD",
    "PROMPT",
    "HostRouting",
    "LayoutError",
    "MicroBatchRouting",
    "MissingSample",
    "MoERouter",
    "Packing",
    "RankSlice",
    "ReplayConfigError",
    "ReplayOptions",
    "ReplayStateError",
    "RoutingReplay",
    "add_routing_replay_args",
    "args_from_options",
    "build_routing_replay",
    "flat_figures",
    "layout_routing",
    "model_geometry",
    "moe_routers",
    "options_from_args",
    "options_from_config",
]
