"""Shims that let megatron-core 0.16.x build and run MoE GPT models on a CPU-only torch.

For tests and the CPU demo only. The replay hook never imports this module and never needs it:
on a GPU machine megatron-core runs unpatched (see ``te_general_gemm`` below for the one
release bug that also bites there, which a GPU trainer without Transformer Engine applies on its
own with :func:`apply_te_gemm_fix`).

What is patched, and why (megatron-core 0.16.x with torch built without CUDA):

- ``torch.cuda.current_device`` returns ``"cpu"``: rotary embeddings, the global memory buffer
  and the router's buffers allocate on ``torch.cuda.current_device()``;
- ``tensor_parallel.random.CudaRNGStatesTracker.fork`` becomes a null context: attention forks
  the CUDA RNG for dropout;
- ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` become no-ops: full
  activation recompute saves and restores the CUDA RNG state;
- ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` become stand-ins: the ``alltoall``
  dispatcher and shared experts create side streams;
- ``moe_utils.te_general_gemm = None`` when Transformer Engine is absent: megatron-core 0.16.x
  names it in the router's gating without importing it (``NameError``; fixed in 0.17);
- rotary embeddings' ``get_pos_emb_on_this_cp_rank`` (context parallel) builds its index in
  pinned memory and moves it with ``.cuda()``: replaced by the same selection on the CPU;
- the ``alltoall`` dispatcher's ``maybe_move_tensor_to_cpu`` turns only GPU tensors into NumPy
  split sizes; on a CPU the sizes stay tensors, which gloo's ``all_to_all_single`` rejects:
  replaced by a version that also converts CPU tensors;
- ``torch.cuda.synchronize`` becomes a no-op, and the pipeline schedules' module-level ``torch``
  a proxy whose ``zeros(..., device="cuda")`` allocates on the CPU: the schedules count tokens
  in a tensor made on ``"cuda"`` by name, and pipeline send/receive synchronises the device.

Use it as a context manager or as an explicit pair::

    with cpu_compat.patched():
        model = GPTModel(...)

    shims = cpu_compat.apply()
    try:
        ...
    finally:
        shims.undo()

Patches nest: applying twice and undoing twice restores the original objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["CpuShims", "apply", "apply_te_gemm_fix", "patched"]


class _EventStandIn:
    """Stands in for ``torch.cuda.Event``: already complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _StreamStandIn:
    """Stands in for ``torch.cuda.Stream`` on a CPU: every operation is immediate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _EventStandIn()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _StreamStandIn:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_STANDIN_STREAM = _StreamStandIn()


def _current_device() -> str:
    return "cpu"


def _current_stream(device: Any = None) -> _StreamStandIn:
    return _STANDIN_STREAM


def _stream(stream: Any = None) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(stream)


@contextlib.contextmanager
def _null_fork(self: Any, name: str = "") -> Iterator[None]:
    yield


class _SchedulesTorch:
    """``torch`` as the pipeline schedules see it: ``device="cuda"`` in ``zeros`` means CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    pos_emb = pos_emb.view(*shape[:seq_dim], 2 * cp_size, -1, *shape[seq_dim + 1 :])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])


def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _synchronize(device: Any = None) -> None:
    return None


def _get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _set_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


def apply_te_gemm_fix() -> bool:
    """Set ``moe_utils.te_general_gemm = None`` where megatron-core 0.16.x leaves it undefined
    (Transformer Engine absent). Harmless on any release: returns whether it set anything."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


class CpuShims:
    """The applied patches; :meth:`undo` puts every original object back."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._active = False

    def _set(self, owner: Any, name: str, value: Any) -> None:
        had = name in vars(owner) if isinstance(owner, type) else hasattr(owner, name)
        self._saved.append((owner, name, getattr(owner, name, None), had))
        setattr(owner, name, value)

    def apply(self) -> CpuShims:
        if self._active:
            raise RuntimeError("these CPU shims are already applied")
        from megatron.core.models.common.embeddings import rotary_pos_embedding
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.tensor_parallel import random as tp_random
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        self._set(torch.cuda, "current_device", _current_device)
        self._set(torch.cuda, "Stream", _StreamStandIn)
        self._set(torch.cuda, "current_stream", _current_stream)
        self._set(torch.cuda, "stream", _stream)
        self._set(torch.cuda, "synchronize", _synchronize)
        self._set(schedules, "torch", _SchedulesTorch())
        self._set(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_cpu)
        self._set(rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", _pos_emb_on_this_cp_rank)
        self._set(tp_random.CudaRNGStatesTracker, "fork", _null_fork)
        self._set(tp_random, "_get_cuda_rng_state", _get_rng_state)
        self._set(tp_random, "_set_cuda_rng_state", _set_rng_state)
        if not hasattr(moe_utils, "te_general_gemm"):
            self._set(moe_utils, "te_general_gemm", None)
        self._active = True
        return self

    def undo(self) -> None:
        """Restore everything :meth:`apply` replaced (in reverse order); idempotent."""
        while self._saved:
            owner, name, value, had = self._saved.pop()
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> CpuShims:
        return self if self._active else self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def apply() -> CpuShims:
    """Apply the CPU shims now; call ``.undo()`` on the result to take them back."""
    return CpuShims().apply()


@contextlib.contextmanager
def patched() -> Iterator[CpuShims]:
    """The CPU shims for the duration of a ``with`` block."""
    shims = apply()
    try:
        yield shims
    finally:
        shims.undo()
