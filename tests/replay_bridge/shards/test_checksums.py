"""Format 4's checksums (XXH3-128 per object, XXH3-64 per record batch), computed here with
xxhash directly, not through the library; format-3 datasets (SHA-256, CRC-32) still read,
verify and catch corruption with their own checksums; a dataset holding both reads whole."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pyarrow.compute as pc
import pytest
import xxhash

from replay_bridge.checks import CheckReport
from replay_bridge.shards import (FORMAT_VERSION, Manifest, ShardError, ShardReader,
                                  ShardWriter, validate_dataset)
from replay_bridge.shards._store import open_store

from .helpers import (corrupt_batch, edit_manifest, listed_shards, manifest_doc, read_index,
                      read_object, set_format_version, writer_ids)


def _write(uri, geometry, samples, **options):
    """``samples`` stored and one id quarantined, in shards of 3 and small record batches."""
    options.setdefault("writer_id", "w0")
    with ShardWriter(uri, geometry, samples_per_shard=3, batch_bytes=300, **options) as w:
        for s in samples:
            w.add(s)
        w.quarantine(CheckReport(f"bad-{options['writer_id']}", kinds=("all_zero",),
                                 message="zeros"))


def _ranges(uri, writer=None):
    """``(shard position, offset, length, checksum)`` of each stored record batch."""
    t = read_index(uri, writer)
    t = t.filter(pc.equal(t.column("outcome"), 0))
    column = t.column(t.schema.names[9]).to_pylist()
    rows = zip(t.column("shard").to_pylist(), t.column("offset").to_pylist(),
               t.column("length").to_pylist(), column)
    return sorted(set(rows))


def test_format_4_objects_and_batches_carry_xxh3(dataset_uri, tiny, samples):
    _write(dataset_uri, tiny, samples)
    doc = manifest_doc(dataset_uri)
    assert doc["format_version"] == FORMAT_VERSION == 4
    entries = doc["shards"] + doc["quarantine"] + [doc["index"]]
    assert len(doc["shards"]) >= 2 and doc["quarantine"]
    for e in entries:
        assert "sha256" not in e
        assert e["xxh3_128"] == xxhash.xxh3_128_hexdigest(read_object(dataset_uri, e["file"]))
    assert read_index(dataset_uri).schema.field(9).name == "xxh3_64"
    ranges = _ranges(dataset_uri)
    assert len(ranges) > len(doc["shards"])  # several record batches per shard
    for shard, offset, length, checksum in ranges:
        data = read_object(dataset_uri, doc["shards"][shard]["file"])
        assert checksum == xxhash.xxh3_64_intdigest(data[offset:offset + length])
    assert validate_dataset(dataset_uri).ok


def test_a_format_3_dataset_reads_and_checks_with_its_own_checksums(dataset_uri, tiny, samples):
    _write(dataset_uri, tiny, samples)
    set_format_version(dataset_uri, 3)
    doc = manifest_doc(dataset_uri)
    for e in doc["shards"] + doc["quarantine"] + [doc["index"]]:
        assert e["sha256"] == hashlib.sha256(read_object(dataset_uri, e["file"])).hexdigest()
    for shard, offset, length, crc in _ranges(dataset_uri):
        data = read_object(dataset_uri, doc["shards"][shard]["file"])
        assert crc == zlib.crc32(data[offset:offset + length])
    for verify in (True, "read"):
        r = ShardReader(dataset_uri, verify=verify)
        assert r.manifest.format_version == 3 and len(r) == len(samples)
        for s in samples:
            np.testing.assert_array_equal(r.routing(s.sample_id), s.routed)
    assert validate_dataset(dataset_uri).ok

    first = listed_shards(dataset_uri)[0]
    corrupt_batch(dataset_uri, first, 0)
    with pytest.raises(ShardError, match=f"{first}: sha256 .* does not match"):
        ShardReader(dataset_uri, verify=True)
    with pytest.raises(ShardError, match=f"{first}: record batch 0 .* has crc32 [0-9a-f]{{8}}, "
                                         r"its index says [0-9a-f]{8}"):
        ShardReader(dataset_uri).routing(samples[0].sample_id)
    kinds = {(f.file, f.kind) for f in validate_dataset(dataset_uri).faults}
    assert (first, "checksum") in kinds


def test_a_dataset_of_format_3_and_4_writers(dataset_uri, tiny, samples):
    old, new = samples[:5], samples[5:]
    _write(dataset_uri, tiny, old, writer_id="old")
    set_format_version(dataset_uri, 3, "old")
    _write(dataset_uri, tiny, new, writer_id="new", resume=True)
    assert {w: manifest_doc(dataset_uri, w)["format_version"]
            for w in writer_ids(dataset_uri)} == {"old": 3, "new": 4}
    r = ShardReader(dataset_uri, verify=True)
    assert len(r) == len(samples)
    for s in samples:
        np.testing.assert_array_equal(r.routing(s.sample_id), s.routed)
    merged = r.manifest.to_dict()  # each entry keeps its own algorithm
    keys = {e["file"].split("-")[1]: ("sha256" in e, "xxh3_128" in e) for e in merged["shards"]}
    assert keys == {"old": (True, False), "new": (False, True)}
    assert Manifest.read(dataset_uri).format_version == 4
    report = validate_dataset(dataset_uri)
    assert report.ok, report.faults

    # a format-3 manifest that names format 4's digest key is refused, not read as one
    edit_manifest(dataset_uri, lambda d: [e.update(xxh3_128=e.pop("sha256")[:32])
                                          for e in d["shards"]], "old")
    with pytest.raises(ShardError, match="bad sha256 None"):
        ShardReader(dataset_uri)


def test_block_checksums_skip_what_comes_before_the_block(tmp_path):
    """The first record batch's block starts past the schema message written before it."""
    store = open_store(tmp_path)
    w = store.create("obj")
    w.write(b"header-bytes")
    w.begin_block(at=20)
    w.write(b"12345678")  # bytes 12..20 are before the block
    w.write(b"block-one")
    start, length, checksum = w.end_block()
    assert (start, length) == (20, 9) and checksum == xxhash.xxh3_64_intdigest(b"block-one")
    w.begin_block()
    w.write(memoryview(np.arange(7, dtype=np.int64)))
    assert w.end_block()[2] == xxhash.xxh3_64_intdigest(np.arange(7, dtype=np.int64).tobytes())
    w.commit()
    data = (tmp_path / "obj").read_bytes()
    assert w.hexdigest == xxhash.xxh3_128_hexdigest(data)
    assert store.digest("obj", "xxh3_128") == w.hexdigest
    assert store.digest("obj", "sha256") == hashlib.sha256(data).hexdigest()
