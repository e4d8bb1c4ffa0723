"""Writer -> reader round trips: identical arrays, dtypes, shapes and order, on a local directory
and on an S3-compatible server (``dataset_uri``); resume, many writers' union and the
duplicate-id rule; what a killed writer leaves unpublished."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import (ShardError, ShardReader, ShardWriter, cleanup_dataset,
                                  validate_dataset)

from .conftest import make_sample
from .helpers import (BLOCK_CHECKSUM, DIGEST, corrupt_batch, index_of, listed_shards, manifest_of,
                      object_names, read_object, shard_name, shard_objects, temp_name, write_object)


def assert_same(a: RoutedSample, b: RoutedSample) -> None:
    assert a.sample_id == b.sample_id
    assert b.routed.dtype == a.routed.dtype
    assert b.routed.shape == a.routed.shape
    np.testing.assert_array_equal(a.routed, b.routed)
    assert b.tokens.dtype == np.int32
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.prompt_len, a.routed_start) == (b.prompt_len, b.routed_start)
    assert (a.group_id, a.policy_version, a.engine, a.finish_reason) == (
        b.group_id, b.policy_version, b.engine, b.finish_reason)
    assert a.weight_versions == b.weight_versions
    if a.logprobs is None:
        assert b.logprobs is None
    else:
        assert b.logprobs.dtype == np.float32
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_round_trip_in_order_and_by_id(dataset_uri, tiny, samples, compression):
    with ShardWriter(dataset_uri, tiny, samples_per_shard=5, batch_bytes=64,
                     compression=compression) as w:
        for s in samples:
            w.add(s)
    r = ShardReader(dataset_uri)
    assert r.geometry == tiny
    assert len(r) == len(samples)
    assert r.sample_ids() == [s.sample_id for s in samples]
    assert [e.file for e in r.manifest.shards] == [shard_name(w.writer_id, i) for i in range(3)]
    assert [e.file for e in r.manifest.shards] == shard_objects(dataset_uri)
    by_id = {s.sample_id: s for s in samples}
    for got in r.read(["s007", "s000", "s011"]):  # in the order asked
        assert_same(by_id[got.sample_id], got)
    assert [x.sample_id for x in r.read(["s007", "s000", "s011"])] == ["s007", "s000", "s011"]
    assert r.index.column("sample_id").to_pylist() == r.sample_ids()
    assert r.index.column("tokens").to_pylist() == [s.num_tokens for s in samples]
    for a, b in zip(samples, r, strict=True):
        assert_same(a, b)
    for s in reversed(samples):
        assert_same(s, r[s.sample_id])
        view = r.routing(s.sample_id)
        assert view.dtype == np.uint8 and view.shape == s.routed.shape
        np.testing.assert_array_equal(view, s.routed)
    batches = list(r.iter_batches())
    assert sum(b.num_rows for b in batches) == len(samples)
    assert r.manifest.tokens == sum(s.num_tokens for s in samples)


def test_uncompressed_routing_is_a_view_of_the_mapped_file(tmp_path, tiny, samples):
    with ShardWriter(tmp_path / "d", tiny, compression="none") as w:
        for s in samples:
            w.add(s)
    r = ShardReader(tmp_path / "d")
    a, b = r.routing("s003"), r.routing("s004")
    assert not a.flags.owndata and not a.flags.writeable
    # both are windows on one contiguous buffer: b starts where a ends
    assert b.__array_interface__["data"][0] == a.__array_interface__["data"][0] + a.nbytes


def test_missing_id_is_a_key_error_naming_it(tmp_path, tiny, samples):
    with ShardWriter(tmp_path / "d", tiny) as w:
        w.add(samples[0])
    r = ShardReader(tmp_path / "d")
    with pytest.raises(KeyError, match="nope"):
        r["nope"]
    with pytest.raises(KeyError, match="nope"):
        r.routing("nope")
    assert "nope" not in r and samples[0].sample_id in r


def test_duplicate_id_refused_in_one_run_and_across_resume(dataset_uri, tiny, samples):
    with ShardWriter(dataset_uri, tiny, samples_per_shard=2) as w:
        w.add(samples[0])
        with pytest.raises(ValueError, match="s000"):
            w.add(samples[0])
        w.add(samples[1])
    with ShardWriter(dataset_uri, tiny, resume=True) as w:
        assert w.stored_ids == {"s000", "s001"}
        assert w.stored_earlier("s000")
        with pytest.raises(ValueError, match="already stored"):
            w.add(samples[1])
    assert len(ShardReader(dataset_uri)) == 2


def test_geometry_shape_mismatch_refused(tmp_path, tiny, samples):
    other = RoutingGeometry(4, (0, 1, 2, 3), 3, 8)
    bad = make_sample(other, "bad", 10)
    with ShardWriter(tmp_path / "d", tiny) as w:
        with pytest.raises(ValueError, match=r"'bad'.*\[rows, 4, 2\]"):
            w.add(bad)
        wide = samples[0]
        wide.routed = wide.routed.astype(np.int32)
        w.add(wide)  # integer ids that fit are narrowed
        oor = samples[1]
        oor.routed = oor.routed.astype(np.int32) + 8
        with pytest.raises(ValueError, match="outside"):
            w.add(oor)
    r = ShardReader(tmp_path / "d")
    assert r.routing("s000").dtype == np.uint8 and len(r) == 1


def test_existing_dir_needs_resume_and_same_geometry(dataset_uri, tiny, samples):
    with ShardWriter(dataset_uri, tiny) as w:
        w.add(samples[0])
    with pytest.raises(ShardError, match="resume"):
        ShardWriter(dataset_uri, tiny)
    with pytest.raises(ValueError, match="top_k"):
        ShardWriter(dataset_uri, RoutingGeometry(4, (0, 1, 2, 3), 3, 8), resume=True)
    with pytest.raises(ShardError, match="taken"):  # every writer needs its own id
        ShardWriter(dataset_uri, tiny, resume=True, writer_id=w.writer_id)
    assert len(object_names(dataset_uri)) == 3  # nothing written by the refused writers


def test_resume_is_a_new_writer_with_its_own_objects(dataset_uri, tiny, samples):
    with ShardWriter(dataset_uri, tiny, samples_per_shard=3) as w1:
        for s in samples[:6]:
            w1.add(s)
    first = {n: read_object(dataset_uri, n) for n in object_names(dataset_uri)}
    with ShardWriter(dataset_uri, tiny, samples_per_shard=3, resume=True) as w2:
        assert w2.writer_id != w1.writer_id
        assert w2.stored_ids == {s.sample_id for s in samples[:6]}
        for s in samples[6:]:
            w2.add(s)
        assert w2.stats.stored == len(samples) - 6  # this writer's own
    # the first writer's objects are untouched; the second published its own
    assert {n: read_object(dataset_uri, n) for n in first} == first
    r = ShardReader(dataset_uri)
    assert [e.file for e in r.manifest.shards] == [
        *(shard_name(w1.writer_id, i) for i in range(2)),
        *(shard_name(w2.writer_id, i) for i in range(2))]
    assert [m.writer for m in r.manifests] == [w1.writer_id, w2.writer_id]
    assert r.manifest.outcomes["stored"] == len(samples)
    for a, b in zip(samples, r, strict=True):
        assert_same(a, b)
    assert validate_dataset(dataset_uri).ok


def test_temp_files_of_a_killed_local_writer_are_ignored_then_cleaned(tmp_path, tiny, samples):
    d = tmp_path / "d"
    with ShardWriter(d, tiny, samples_per_shard=3, writer_id="w0") as w:
        for s in samples[:6]:
            w.add(s)
    temps = [temp_name(shard_name("w0", 2)), temp_name(manifest_of(d))]
    for t in temps:
        (d / t).write_bytes(b"half an object")
    with ShardWriter(d, tiny, samples_per_shard=3, resume=True) as w:
        # a temp file may be a live writer's: a new writer leaves it alone
        assert all((d / t).exists() for t in temps)
        for s in samples[6:]:
            w.add(s)
    r = ShardReader(d)
    assert len(r) == len(samples)
    report = validate_dataset(d)
    assert report.ok and sorted(x.split(":")[0] for x in report.warnings) == sorted(temps)
    assert cleanup_dataset(d).removed == []  # younger than the default hour: kept
    assert sorted(cleanup_dataset(d, older_than=0).removed) == sorted(temps)
    assert not any((d / t).exists() for t in temps)
    assert validate_dataset(d).warnings == [] and len(ShardReader(d)) == len(samples)


def test_a_shard_sealed_but_never_published_is_not_adopted(dataset_uri, tiny, samples):
    """A writer killed between sealing a shard and publishing the manifest listing it leaves a
    complete but unlisted shard: readers and new writers ignore it (a new writer never adopts
    another writer's objects), validate reports it, cleanup removes it."""
    with ShardWriter(dataset_uri, tiny, samples_per_shard=3) as w:
        for s in samples[:3]:
            w.add(s)
        man, idx = manifest_of(dataset_uri), index_of(dataset_uri)
        before = {n: read_object(dataset_uri, n) for n in (man, idx)}
        for s in samples[3:6]:
            w.add(s)
    # the writer "died" before publishing its second shard: its earlier publish is current
    for name, data in before.items():
        write_object(dataset_uri, name, data)
    unpublished = shard_name(w.writer_id, 1)
    assert unpublished in shard_objects(dataset_uri)
    assert listed_shards(dataset_uri) == [shard_name(w.writer_id, 0)]
    r = ShardReader(dataset_uri)
    assert r.sample_ids() == ["s000", "s001", "s002"]
    report = validate_dataset(dataset_uri)
    assert report.ok
    assert any(x.startswith(f"{unpublished}: unpublished shard") for x in report.warnings)
    with ShardWriter(dataset_uri, tiny, resume=True) as w2:
        assert w2.stored_ids == {"s000", "s001", "s002"}  # not adopted
        for s in samples[3:6]:
            w2.add(s)
    r = ShardReader(dataset_uri)
    assert sorted(r.sample_ids()) == [s.sample_id for s in samples[:6]]
    assert r.duplicates == []
    assert r.manifest.outcomes["stored"] == 6
    removed = cleanup_dataset(dataset_uri, older_than=0).removed
    assert unpublished in removed and unpublished not in object_names(dataset_uri)
    report = validate_dataset(dataset_uri)
    assert report.ok and report.warnings == []
    assert sorted(ShardReader(dataset_uri).sample_ids()) == [s.sample_id for s in samples[:6]]


def test_two_writers_at_once_union_and_the_duplicate_rule(dataset_uri, tiny, samples):
    """Two writers append to one dataset at the same time: the dataset is the union of their
    manifests; an id both stored is read from the writer that started first, and validate
    reports it."""
    a = ShardWriter(dataset_uri, tiny, samples_per_shard=2, writer_id="alpha")
    b = ShardWriter(dataset_uri, tiny, samples_per_shard=2, writer_id="beta", resume=True)
    twin = make_sample(tiny, "s005", 9, seed=99)  # beta's copy of an id alpha stores too
    for i, s in enumerate(samples[:9]):
        (a if i % 2 else b).add(s)
    mid = ShardReader(dataset_uri)  # both publish as they seal: a reader sees sealed shards
    assert sorted(mid.sample_ids()) == [s.sample_id for s in samples[:8]]  # s008 is pending
    b.add(twin)
    a.close()
    b.close()
    r = ShardReader(dataset_uri)
    assert sorted(r.sample_ids()) == [s.sample_id for s in samples[:9]]
    assert [m.writer for m in r.manifests] == ["alpha", "beta"]
    assert_same(samples[5], r["s005"])  # alpha started first: its copy is read
    ((sid, kept, ignored),) = r.duplicates
    assert sid == "s005" and kept.startswith("part-alpha-") and ignored.startswith("part-beta-")
    assert r.manifest.outcomes["stored"] == 9  # each id once
    report = validate_dataset(dataset_uri)
    assert report.ok and report.writers == 2 and len(report.duplicates) == 1
    assert any("'s005' is stored by two writers" in x for x in report.warnings)
    assert len(mid) == 8  # the early reader still reads its snapshot
    for sid in mid.sample_ids():
        assert mid[sid].sample_id == sid


def test_quarantine_and_failures_round_trip(dataset_uri, tiny, samples):
    from replay_bridge.checks import accept
    from replay_bridge.sample import WireSample
    from replay_bridge.shards import decode_routing

    s = samples[2]
    wire = WireSample(sample_id="q1", tokens=s.tokens, prompt_len=s.prompt_len,
                      routing=np.zeros((s.num_tokens - 1, 4, 2), np.int32))
    report, routed = accept(wire, tiny)
    assert routed is None and "all_zero" in report.kinds
    with ShardWriter(dataset_uri, tiny) as w:
        w.add(samples[0])
        w.quarantine(report, wire, note="prefill capture missing")
        w.record_failure("q2", TimeoutError("engine timed out"))
        assert w.stats.quarantined == 1 and w.stats.failed == 1
    r = ShardReader(dataset_uri)
    assert r.manifest.outcomes == {"stored": 1, "rejected": 1, "failed": 1}
    recs = list(r.quarantined())
    assert [x["sample_id"] for x in recs] == ["q1", "q2"]
    q1, q2 = recs
    assert q1["outcome"] == "rejected" and q1["kinds"] == ["all_zero"]
    assert q1["report"]["kinds"] == ["all_zero"] and q1["note"] == "prefill capture missing"
    assert q1["sample"]["tokens"] == s.tokens.tolist()
    np.testing.assert_array_equal(decode_routing(q1), wire.routing)
    assert decode_routing(q1).dtype == np.int32
    assert q2["outcome"] == "failed" and "TimeoutError" in q2["message"]


_GEOMETRIES = st.sampled_from([
    RoutingGeometry(6, (2, 3, 4, 5), 4, 256),          # leading dense layers, uint8 edge
    RoutingGeometry(5, (1, 2, 3, 4), 2, 300),          # uint16 ids
    RoutingGeometry(3, (0, 2), 1, 16),                 # top_k 1, interleaved dense
    RoutingGeometry(61, tuple(range(3, 61)), 8, 256),  # DeepSeek-V3 shape
])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=_GEOMETRIES,
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       per_shard=st.integers(1, 4), starts=st.integers(0, 3),
       compression=st.sampled_from(["zstd", "lz4", "none"]), data=st.data())
def test_round_trip_property(tmp_path_factory, geometry, lengths, per_shard, starts, compression,
                             data):
    d = tmp_path_factory.mktemp("prop") / "d"
    samples = []
    for i, n in enumerate(lengths):
        prompt = data.draw(st.integers(0, n))
        start = min(starts, prompt)
        s = make_sample(geometry, f"id-{i}", n, prompt_len=prompt, routed_start=start, seed=i,
                        logprobs=bool(i % 2))
        if geometry.num_experts > 256:  # make sure ids above 255 round-trip
            s.routed[..., 0] = geometry.num_experts - 1 - (np.arange(s.rows) % 7)[:, None]
        samples.append(s)
    with ShardWriter(d, geometry, samples_per_shard=per_shard, compression=compression,
                     batch_bytes=data.draw(st.sampled_from([1, 1 << 20]))) as w:
        for s in samples:
            w.add(s)
    r = ShardReader(d)
    assert r.geometry == geometry
    assert r.geometry.id_dtype == (np.uint16 if geometry.num_experts > 256 else np.uint8)
    for a, b in zip(samples, r, strict=True):
        assert_same(a, b)
    for s in samples[::-1]:  # by id, across and within record batches
        np.testing.assert_array_equal(r.routing(s.sample_id), s.routed)
        assert_same(s, r[s.sample_id])


def test_reader_sees_a_consistent_snapshot_while_a_writer_appends(dataset_uri, tiny, samples):
    d = dataset_uri
    w = ShardWriter(d, tiny, samples_per_shard=3)
    for s in samples[:4]:
        w.add(s)  # one sealed shard, one sample in the open one
    with ShardReader(d) as r:
        assert r.sample_ids() == ["s000", "s001", "s002"]
        for s in samples[4:]:
            w.add(s)
        w.close()
        assert len(r) == 3 and r.routing("s002").shape == samples[2].routed.shape
    assert len(ShardReader(d)) == len(samples)


def test_decode_routing_refuses_malformed_records():
    from replay_bridge.shards import decode_routing

    ok = {"sample_id": "a", "sample": {"routing": {"dtype": "<i4", "shape": [1, 2],
                                                   "data": "AQAAAAIAAAA="}}}
    np.testing.assert_array_equal(decode_routing(ok), [[1, 2]])
    assert decode_routing({"sample_id": "b"}) is None
    for bad in ({"dtype": "|O", "shape": [1], "data": ""},
                {"dtype": "<i4", "shape": [3], "data": "AQAAAAIAAAA="},
                {"dtype": "<i4", "shape": [2], "data": "not base64!"},
                {"shape": [2], "data": "AQAAAAIAAAA="}):
        with pytest.raises(ValueError, match="'x': malformed routing"):
            decode_routing({"sample_id": "x", "sample": {"routing": bad}})


@pytest.mark.parametrize("threads", [1, 3])
def test_iteration_order_with_read_ahead_threads(tmp_path, tiny, samples, threads):
    d = write_dir_small(tmp_path / "d", tiny, samples)
    r = ShardReader(d)
    ids = [b.column("sample_id").to_pylist() for b in r.iter_batches(threads=threads)]
    assert sum(ids, []) == [s.sample_id for s in samples]
    for a, b in zip(samples, r, strict=True):
        assert_same(a, b)
    it = r.iter_batches(threads=threads)
    next(it)
    it.close()  # stopping early neither hangs nor leaks a running thread pool


def test_read_ahead_surfaces_a_bad_shard_by_name(dataset_uri, tiny, samples):
    d = write_dir_small(dataset_uri, tiny, samples)
    bad = listed_shards(d)[2]
    corrupt_batch(d, bad, 0)  # the object no longer matches its index's checksum
    r = ShardReader(d, verify="read")
    seen = []
    with pytest.raises(ShardError, match=f"{bad}: record batch 0 .* {BLOCK_CHECKSUM}") as e:
        for b in r.iter_batches(threads=2):
            seen.extend(b.column("sample_id").to_pylist())
    assert e.value.kind == "checksum"
    assert set(seen) <= {s.sample_id for s in samples[:10]}
    assert r["s000"].sample_id == "s000"  # the other shards still read
    with pytest.raises(ShardError, match=DIGEST):  # verify=True hashes every shard on open
        ShardReader(d, verify=True)


def write_dir_small(d, geometry, samples):
    with ShardWriter(d, geometry, samples_per_shard=5, batch_bytes=40) as w:
        for s in samples:
            w.add(s)
    return d
