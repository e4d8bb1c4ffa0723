"""Hugging Face ``transformers`` MoE router replay: rollout routing replayed in a
``transformers`` model's routers by forward hooks (no library source patched).

Build a :class:`RoutingReplay` over the model (every guard runs there), lay out each
micro-batch with :meth:`RoutingReplay.prepare` from its attention mask (padded batch) or its
``position_ids`` (packed sequences), and run its forward and backward inside
:meth:`RoutingReplay.replaying`::

    replay = RoutingReplay(model, reader.geometry, source=reader)
    mb = replay.prepare(sample_ids, attention_mask=batch["attention_mask"])
    with replay.replaying(mb):
        loss = loss_fn(model(**batch))
        loss.backward()            # gradient checkpointing's recompute replays the same ids
    log(replay.metrics())

Or with the switch shared with the megatron hook: ``routing_replay:`` with ``trainer: hf``
(YAML) or ``--routing-replay --routing-replay-trainer hf`` read into :class:`ReplayOptions`,
then ``build_routing_replay(options, model)`` (``None`` when replay is off).

Families: see :data:`FAMILIES` (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, GLM-4.5) and
``trainer_hooks/hf/README.md``. The layout names and region codes are the library's
(:mod:`replay_bridge.layout`), the agreement counter and the errors the Megatron hook's.
"""

from replay_bridge.layout import COMPLETION, NATIVE, PAD, PROMPT, LayoutError, MissingSample
from trainer_hooks.megatron import AgreementCounter, ReplayConfigError, ReplayStateError

from trainer_hooks.options import (
    ReplayOptions,
    add_routing_replay_args,
    options_from_args,
    options_from_config,
)

from ._families import (FAMILIES, FamilyAdapter, GroupedSigmoidTopK, RouterSite, SoftmaxTopK,
                        adapter_for)
from ._grid import Spans, grid_routing, packed_spans, padded_spans
from ._flag import build_routing_replay
from ._replay import MicroBatchRouting, RoutingReplay, model_geometry

__all__ = [
    "AgreementCounter",
    "COMPLETION",
    "FAMILIES",
    "FamilyAdapter",
    "GroupedSigmoidTopK",
    "LayoutError",
    "MicroBatchRouting",
    "MissingSample",
    "NATIVE",
    "PAD",
    "PROMPT",
    "ReplayConfigError",
    "ReplayOptions",
    "ReplayStateError",
    "RouterSite",
    "RoutingReplay",
    "SoftmaxTopK",
    "Spans",
    "adapter_for",
    "add_routing_replay_args",
    "build_routing_replay",
    "grid_routing",
    "model_geometry",
    "options_from_args",
    "options_from_config",
    "packed_spans",
    "padded_spans",
]
