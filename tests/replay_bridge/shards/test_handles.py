"""A reader is a handle: it pickles as its URI and the shards it saw, and reopens lazily in
another process (multiprocessing, torch DataLoader workers), reading only what it is asked."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import ShardReader, ShardWriter

from .conftest import make_sample


def _write(uri: str, geometry: RoutingGeometry, samples: list[RoutedSample], **kw) -> None:  # noqa: ANN003
    with ShardWriter(uri, geometry, samples_per_shard=4, batch_bytes=64, **kw) as w:
        for s in samples:
            w.add(s)


def _routing_sums(reader: ShardReader, ids: list[str]) -> list[int]:
    return [int(s.routed.astype(np.int64).sum()) for s in reader.read(ids)]


def test_pickled_reader_reopens_lazily_and_sees_the_same_shards(
        dataset_uri: str, tiny: RoutingGeometry) -> None:
    first = [make_sample(tiny, f"a{i}", 6 + i, seed=i) for i in range(10)]
    _write(dataset_uri, tiny, first)
    reader = ShardReader(dataset_uri)
    blob = pickle.dumps(reader)
    assert len(blob) < 4096  # a handle, not the data
    assert b"routed" not in blob
    # Another writer publishes more after the pickle was taken.
    _write(dataset_uri, tiny, [make_sample(tiny, f"b{i}", 7, seed=50 + i) for i in range(5)],
           resume=True)
    copy = pickle.loads(blob)
    assert copy.__dict__["_view"] is None  # not opened yet
    assert len(copy) == 10 and copy.sample_ids() == [s.sample_id for s in first]
    assert (copy.routing("a7") == first[7].routed).all()
    assert len(ShardReader(dataset_uri)) == 15  # a fresh reader sees both writers


def _child(blob: bytes, ids: list[str], q) -> None:  # noqa: ANN001
    reader = pickle.loads(blob)
    q.put((ids, _routing_sums(reader, ids)))


def test_spawned_processes_read_their_own_subsets(dataset_uri: str,
                                                  tiny: RoutingGeometry) -> None:
    samples = [make_sample(tiny, f"s{i:02d}", 5 + i % 7, seed=i) for i in range(24)]
    _write(dataset_uri, tiny, samples)
    reader = ShardReader(dataset_uri)
    blob = pickle.dumps(reader)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [[s.sample_id for s in samples[r::3]] for r in range(3)]
    procs = [ctx.Process(target=_child, args=(blob, ids, q)) for ids in shares]
    for p in procs:
        p.start()
    got = dict((tuple(ids), sums) for ids, sums in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = {s.sample_id: int(s.routed.astype(np.int64).sum()) for s in samples}
    for ids in shares:
        assert got[tuple(ids)] == [want[i] for i in ids]


class RoutingTotals:
    """A map-style dataset over a reader (what a DataLoader pickles into each worker)."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self.ids = reader.sample_ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.ids[i], int(self.reader.routing(self.ids[i]).astype(np.int64).sum())


def test_torch_dataloader_workers_read_through_the_reader(tmp_path,  # noqa: ANN001
                                                          tiny: RoutingGeometry) -> None:
    torch = pytest.importorskip("torch")
    samples = [make_sample(tiny, f"s{i:02d}", 6 + i % 5, seed=i) for i in range(16)]
    uri = str(tmp_path / "ds")
    _write(uri, tiny, samples)

    loader = torch.utils.data.DataLoader(RoutingTotals(ShardReader(uri)), batch_size=None,
                                         num_workers=2, multiprocessing_context="spawn")
    got = dict((sid, int(total)) for sid, total in loader)
    assert got == {s.sample_id: int(s.routed.astype(np.int64).sum()) for s in samples}


def test_read_fetches_only_the_record_batches_holding_the_ids(
        tmp_path, tiny: RoutingGeometry, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    samples = [make_sample(tiny, f"s{i:02d}", 6, seed=i) for i in range(40)]
    uri = str(tmp_path / "ds")
    _write(uri, tiny, samples)
    reader = ShardReader(uri)
    fetched: list[tuple[int, int]] = []
    real = reader._fetch

    def spy(first: int):  # noqa: ANN202
        fetched.append((int(reader._obj[first]), int(reader._batchno[first])))
        return real(first)

    monkeypatch.setattr(reader, "_fetch", spy)
    ids = ["s33", "s02", "s17"]
    got = reader.read(ids)
    assert [s.sample_id for s in got] == ids
    assert all((g.routed == samples[int(i[1:])].routed).all() for g, i in zip(got, ids))
    # Each sample's batch once, and no other (the dataset holds many more batches).
    where = {reader._locate(i) for i in ids}
    want = {(int(reader._obj[i]), int(reader._batchno[reader._block_of(i)])) for i in where}
    assert sorted(fetched) == sorted(want) and len(fetched) == 3
    assert len(set(zip(reader._obj.tolist(), reader._batchno.tolist()))) > 10
    with pytest.raises(KeyError, match="nope"):
        reader.read(["s01", "nope"])
