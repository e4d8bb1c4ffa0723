"""Test support for the rank loader: synthetic grouped samples and an in-memory reader with the
shard reader's ``index`` / ``read`` / ``geometry`` that records every read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample

GEO = RoutingGeometry(6, (1, 2, 4, 5), 4, 16)  # dense layers 0 and 3
VOCAB = 97


def make_samples(groups: Sequence[int], solo: int = 0, seed: int = 0,
                 lengths: tuple[int, int] = (4, 40)) -> list[RoutedSample]:
    """``groups[g]`` samples in group ``G{g}``, then ``solo`` samples without a group; random
    lengths, prompt lengths in ``[1, n - 1]``, routed from ``routed_start`` (0 or 1)."""
    rng = np.random.default_rng(seed)
    out: list[RoutedSample] = []

    def one(sid: str, gid: str | None) -> RoutedSample:
        n = int(rng.integers(*lengths))
        start = int(rng.integers(0, 2))
        keys = rng.random((n - 1 - start, GEO.num_moe_layers, GEO.num_experts))
        return RoutedSample(
            sample_id=sid, group_id=gid, tokens=rng.integers(1, VOCAB, n).astype(np.int32),
            prompt_len=int(rng.integers(max(start, 1), n)), routed_start=start,
            routed=np.argsort(keys, -1)[..., : GEO.top_k].astype(GEO.id_dtype))

    for g, size in enumerate(groups):
        out += [one(f"G{g}-{j}", f"G{g}") for j in range(size)]
    out += [one(f"solo{j}", None) for j in range(solo)]
    return out


def index_of(samples: Sequence[RoutedSample]) -> pa.Table:
    """The shard reader's index columns for ``samples``, in their order."""
    return pa.table({
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "group_id": pa.array([s.group_id for s in samples], pa.string()),
        "tokens": pa.array([s.num_tokens for s in samples], pa.int32()),
        "prompt_len": pa.array([s.prompt_len for s in samples], pa.int32()),
        "routed_start": pa.array([s.routed_start for s in samples], pa.int32()),
    })


class MemoryReader:
    """``index``, ``read(ids)`` and ``geometry`` over samples held in memory; ``reads`` lists
    the ids of every ``read`` call."""

    def __init__(self, samples: Sequence[RoutedSample], geometry: RoutingGeometry = GEO) -> None:
        self.geometry = geometry
        self._by_id = {s.sample_id: s for s in samples}
        self.index = index_of(samples)
        self.reads: list[list[str]] = []

    def read(self, ids: Sequence[str]) -> list[RoutedSample]:
        self.reads.append(list(ids))
        return [self._by_id[i] for i in ids]

    @property
    def ids_read(self) -> list[str]:
        return [i for call in self.reads for i in call]
