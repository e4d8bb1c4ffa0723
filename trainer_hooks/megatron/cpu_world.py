"""A megatron-core world of one process on the CPU, for the duration of a ``with`` block.

Creates what is missing (a gloo process group over an in-memory store, megatron's parallel
state with every parallel size 1), applies the CPU shims megatron-core 0.16 needs on a CPU-only
torch (``trainer_hooks.megatron.cpu_compat``), sets torch's thread count, and sets aside
megatron-core's process-wide ``RouterReplay`` instance list; on exit everything is put back as
it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["megatron_cpu_world", "fresh_router_replay_list"]


@contextlib.contextmanager
def megatron_cpu_world(threads: int) -> Iterator[None]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from trainer_hooks.megatron import cpu_compat

    instances = RouterReplay.global_router_replay_instances
    saved = list(instances)
    old_threads = torch.get_num_threads()
    shims = cpu_compat.apply()
    created_group = created_state = False
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            created_group = True
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
            created_state = True
        torch.set_num_threads(threads)
        instances.clear()
        yield
    finally:
        instances[:] = saved
        torch.set_num_threads(old_threads)
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()
        shims.undo()


def fresh_router_replay_list() -> None:
    """Forget the ``RouterReplay`` instances of models built earlier in this world. Housekeeping
    only: megatron-core's process-wide list keeps every model's instances alive; the replay hook
    never reads it."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    for inst in RouterReplay.global_router_replay_instances:
        inst.clear_indices()
        inst.clear_router_replay_action()
    RouterReplay.clear_global_router_replay_instances()
