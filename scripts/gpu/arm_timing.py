"""Timing of a benchmark's arms, interleaved, for the overhead scripts of this folder
(``replay_overhead.py``, ``hf_replay_overhead.py``).

An arm is a name that ``step(arm)`` runs one timed step of and returns its figures for.
:func:`interleaved_rounds` warms every arm up, then runs every arm once per round in an order
rotated each round, with the garbage collector off; :func:`host_syncs` counts the host syncs
of one step per arm on CUDA.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["host_syncs", "interleaved_rounds"]

T = TypeVar("T")


def interleaved_rounds(
    step: Callable[[str], T],
    arms: Sequence[str],
    rounds: int,
    warmup: int,
    after_warmup: Callable[[], Any] | None = None,
) -> dict[str, list[T]]:
    """``warmup`` rounds of every arm (results dropped), then ``after_warmup()``, then
    ``rounds`` rounds, round ``r`` starting at arm ``r % len(arms)``, GC collected first and
    off while timing. Returns each arm's ``step`` results in round order."""
    for _ in range(warmup):
        for a in arms:
            step(a)
    if after_warmup is not None:
        after_warmup()
    out: dict[str, list[T]] = {a: [] for a in arms}
    order = list(arms)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(order)
            for a in order[k:] + order[:k]:
                out[a].append(step(a))
    finally:
        gc.enable()
    return out


def host_syncs(step: Callable[[str], Any], arms: Sequence[str]) -> dict[str, int]:
    """Host syncs in one ``step`` per arm, counted from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only)."""
    syncs: dict[str, int] = {}
    for a in arms:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(a)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[a] = sum("synchroniz" in str(x.message) for x in w)
    return syncs
