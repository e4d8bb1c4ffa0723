"""A writer that publishes nothing into a dataset that already holds data withdraws its empty
manifest on close; one that creates a dataset, or stores anything, keeps it."""

from __future__ import annotations

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter, is_dataset

from .conftest import make_sample
from .helpers import writer_ids


def test_idle_resumes_leave_no_manifest_behind(dataset_uri: str, tiny: RoutingGeometry) -> None:
    with ShardWriter(dataset_uri, tiny, writer_id="first") as w:
        w.add(make_sample(tiny, "a", 6))
    for _ in range(3):  # resumes that find everything stored already
        with ShardWriter(dataset_uri, tiny, resume=True) as w:
            assert "a" in w
    assert writer_ids(dataset_uri) == ["first"]
    with ShardWriter(dataset_uri, tiny, resume=True, writer_id="second") as w:
        w.add(make_sample(tiny, "b", 7, seed=1))
    assert writer_ids(dataset_uri) == ["first", "second"]
    assert sorted(ShardReader(dataset_uri).sample_ids()) == ["a", "b"]


def test_a_writer_that_creates_a_dataset_keeps_its_manifest(dataset_uri: str,
                                                            tiny: RoutingGeometry) -> None:
    ShardWriter(dataset_uri, tiny, writer_id="creator").close()
    assert is_dataset(dataset_uri) and writer_ids(dataset_uri) == ["creator"]
    # joining a dataset that holds nothing yet: nothing to fall back on, so it stays too
    ShardWriter(dataset_uri, tiny, resume=True, writer_id="joiner").close()
    assert writer_ids(dataset_uri) == ["creator", "joiner"]
    assert len(ShardReader(dataset_uri)) == 0
