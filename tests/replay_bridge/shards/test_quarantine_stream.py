"""Quarantine records stream to disk as they come: the writer's memory follows the open chunk,
never the number rejected; chunks are sealed and listed at their bound; a record's routing
round-trips byte for byte. On a local directory and on an S3-compatible server (where the open
chunk is an upload nobody sees until it is sealed)."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import numpy as np
import orjson
import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample
from replay_bridge.shards import Manifest, ShardReader, ShardWriter, decode_routing

from .conftest import make_sample
from .helpers import (is_local, listed_chunks, local_path, object_names, quarantine_name,
                      read_object, run_cli, temp_name)


def rejected(geometry: RoutingGeometry, sid: str, rows: int, seed: int = 0) -> WireSample:
    """A decoded sample whose wire routing (int32, every layer) is all zero but one id."""
    rng = np.random.default_rng(seed)
    routing = np.zeros((rows, geometry.num_layers, geometry.top_k), np.int32)
    routing[0, 0, 0] = seed % geometry.num_experts
    return WireSample(sample_id=sid, tokens=rng.integers(0, 1000, rows + 1).astype(np.int32),
                      prompt_len=1, routing=routing, engine="sglang")


def report(sid: str) -> CheckReport:
    return CheckReport(sid, kinds=("all_zero",), message=f"sample {sid!r}: all_zero")


def test_records_are_sealed_and_listed_at_the_record_bound(dataset_uri: str,
                                                           tiny: RoutingGeometry) -> None:
    d = dataset_uri
    w = ShardWriter(d, tiny, quarantine_records=4)
    for i in range(10):
        w.quarantine(report(f"r{i}"), rejected(tiny, f"r{i}", 30, seed=i))
        assert len(w._chunk.entries if w._chunk else ()) < 4  # never more than the bound
    # Before any flush: two full chunks are stored and listed, two records are in the open one.
    m = Manifest.read(d)
    assert [(q.file, q.records) for q in m.quarantine] == [
        (quarantine_name(w.writer_id, 0), 4), (quarantine_name(w.writer_id, 1), 4)]
    assert m.outcomes == {"stored": 0, "rejected": 8, "failed": 0}
    open_chunk = quarantine_name(w.writer_id, 2)
    assert open_chunk not in object_names(d)  # invisible under its name until sealed
    if is_local(d):  # written as it comes, to a temp file
        assert local_path(d, temp_name(open_chunk)).stat().st_size > 0
    assert w.stats.quarantined == 10
    w.close()
    assert Manifest.read(d).quarantined == 10
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0 and doc["quarantine"]["records"] == 10, doc


def test_records_are_sealed_at_the_byte_bound(dataset_uri: str, tiny: RoutingGeometry) -> None:
    d = dataset_uri
    w = ShardWriter(d, tiny, quarantine_bytes=20_000)
    for i in range(6):  # each record carries 500 x 4 x 2 int32 ids: ~5.4 kB of base64
        w.quarantine(report(f"r{i}"), rejected(tiny, f"r{i}", 500, seed=i))
    sizes = [q.bytes for q in Manifest.read(d).quarantine]
    assert sizes and all(20_000 <= s < 20_000 + 12_000 for s in sizes), sizes
    w.close()


def test_the_writer_holds_no_record_of_a_rejected_sample(tmp_path: Path,
                                                         tiny: RoutingGeometry) -> None:
    """Python memory traced while 40 samples of 96 kB of routing each are quarantined stays
    below the size of 4 of them: nothing of a written record is kept."""
    d = tmp_path / "d"
    samples = [rejected(tiny, f"r{i}", 3000, seed=i) for i in range(3)]
    per_sample = samples[0].routing.nbytes
    with ShardWriter(d, tiny) as w:
        w.quarantine(report("warm"), samples[0])  # open the chunk, warm the encoder
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(40):
                w.quarantine(report(f"r{i}"), samples[i % 3])
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert held < 4 * per_sample, (held, per_sample)
    assert Manifest.read(d).quarantined == 41


def test_routing_round_trips_through_the_piecewise_encoder(dataset_uri: str,
                                                           tiny: RoutingGeometry,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from replay_bridge.shards import _quarantine

    monkeypatch.setattr(_quarantine, "_B64_PIECE", 3 * 7)  # many pieces, a short last one
    d = dataset_uri
    wide = [rejected(tiny, f"r{i}", rows, seed=i) for i, rows in enumerate((1, 5, 77))]
    empty = rejected(tiny, "empty", 1)
    empty.routing = empty.routing[:0]  # no rows at all: shape (0, layers, k)
    wide.append(empty)
    with ShardWriter(d, tiny) as w:
        for s in wide:
            w.quarantine(report(s.sample_id), s, note="piecewise")
        w.quarantine(report("none"))
        w.record_failure("lost", TimeoutError("read timed out"))
    records = {r["sample_id"]: r for r in ShardReader(d).quarantined()}
    for s in wide:
        np.testing.assert_array_equal(decode_routing(records[s.sample_id]), s.routing)
        assert records[s.sample_id]["note"] == "piecewise"
    assert decode_routing(records["none"]) is None
    assert records["lost"]["outcome"] == "failed"
    (chunk,) = listed_chunks(d)
    for line in read_object(d, chunk).splitlines():
        orjson.loads(line)  # every line is one JSON object


def test_a_stored_sample_and_streamed_records_share_a_flush(dataset_uri: str,
                                                            tiny: RoutingGeometry) -> None:
    d = dataset_uri
    with ShardWriter(d, tiny, samples_per_shard=100, quarantine_records=3) as w:
        for i in range(7):
            w.add(make_sample(tiny, f"s{i}", 20, seed=i))
            w.quarantine(report(f"r{i}"), rejected(tiny, f"r{i}", 10, seed=i))
        mid = Manifest.read(d)
        assert mid.samples == 0 and mid.quarantined == 6  # shards seal at 100 or a flush
    m = Manifest.read(d)
    assert m.outcomes == {"stored": 7, "rejected": 7, "failed": 0}
    assert len(m.quarantine) == 3
