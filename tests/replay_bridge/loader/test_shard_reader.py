"""The loader over a shard dataset (local and S3 on loopback): the plan comes from the reader's
index alone, each rank reads its own ids only, and what it yields is what was stored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from replay_bridge.layout import Packing
from replay_bridge.loader import RankLoader
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import ShardReader, ShardWriter

from .helpers import GEO, MemoryReader, make_samples


class Spy:
    """A reader that records the ids of every ``read`` (everything else passes through)."""

    def __init__(self, reader: ShardReader) -> None:
        self._reader, self.asked = reader, []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._reader, name)

    def read(self, ids: Sequence[str]) -> list[RoutedSample]:
        self.asked += list(ids)
        return self._reader.read(ids)


def test_ranks_train_from_a_dataset_uri(dataset_uri):
    samples = make_samples([4] * 8, solo=4, seed=12)
    with ShardWriter(dataset_uri, GEO, samples_per_shard=9, batch_bytes=1024) as w:
        for s in reversed(samples):  # storage order differs from the in-memory one
            w.add(s)
    by_id = {s.sample_id: s for s in samples}
    kw = dict(world_size=2, packing=Packing.thd(pad_multiple=2), max_tokens=80, seed=1, step=3)
    seen: list[str] = []
    for rank in range(2):
        reader = Spy(ShardReader(dataset_uri))
        loader = RankLoader(reader, rank=rank, **kw)
        assert reader.asked == []
        # Same plan as over the samples in memory: the plan never depends on storage order.
        assert loader.plan.to_dict() == RankLoader(MemoryReader(samples), rank=rank,
                                                   **kw).plan.to_dict()
        for mb in loader:
            for s in mb.samples:
                want = by_id[s.sample_id]
                np.testing.assert_array_equal(s.tokens, want.tokens)
                np.testing.assert_array_equal(s.routed, want.routed)
                assert (s.prompt_len, s.group_id) == (want.prompt_len, want.group_id)
            assert mb.routing is not None and mb.routing.num_tokens == mb.num_tokens
        assert reader.asked == loader.plan.ids(rank)
        seen += reader.asked
    assert sorted(seen) == sorted(by_id)
