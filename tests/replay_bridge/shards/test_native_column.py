"""Formats 3 and 4: the ``native`` column (rows the trainer routes itself) through writer, reader,
validate and the record-batch hand-off, on a local directory and on S3; hostile ``native``
values refused naming the sample and the rule; format-2 datasets (no column) read with
``native`` ``None``, validated, and appended to."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from replay_bridge.checks import check_routed
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import (FORMAT_VERSION, Manifest, ShardError, ShardReader, ShardWriter,
                                  UnstorableSample, from_record_batch, schema_for,
                                  to_record_batch, validate_dataset)
from replay_bridge.shards._rules import batch_breaks

from .conftest import make_sample
from .helpers import (edit_manifest, listed_shards, manifest_doc, read_object, rewrite_shard,
                      run_cli, set_format_version, with_format_label, write_dir, writer_ids)


def marked(g: RoutingGeometry, sid: str, num_tokens: int, rows: tuple[int, ...] = (),
           seed: int = 0, mask: bool = True, **kw: Any) -> RoutedSample:
    """A valid sample whose routing ``rows`` are native (ids 0 there, as ``accept`` stores
    them); ``mask=False``: no mask at all."""
    s = make_sample(g, sid, num_tokens, seed=seed, **kw)
    if mask:
        native = np.zeros(s.rows, bool)
        native[list(rows)] = True
        s.routed[native] = 0
        s.native = native
    return s


def mixed(g: RoutingGeometry) -> list[RoutedSample]:
    return [
        marked(g, "m0", 14, (0, 1, 2), seed=0),  # leading rows (an earlier turn)
        marked(g, "plain", 12, seed=1, mask=False),
        marked(g, "all-false", 11, (), seed=2),  # a mask marking nothing: stored as null
        marked(g, "m3", 16, (5, 14), seed=3, logprobs=False),  # a prompt and the last row
        marked(g, "m4", 9, tuple(range(8)), seed=4),  # every row
        marked(g, "plain2", 10, seed=5, mask=False),
        marked(g, "m6", 13, (7,), seed=6),
    ]


def _want(s: RoutedSample) -> np.ndarray | None:
    return s.native if s.native is not None and s.native.any() else None


def _same(got: RoutedSample, want: RoutedSample) -> None:
    assert got.sample_id == want.sample_id
    np.testing.assert_array_equal(got.routed, want.routed)
    if _want(want) is None:
        assert got.native is None, got.sample_id
    else:
        assert got.native.dtype == np.bool_
        np.testing.assert_array_equal(got.native, want.native)


# ---- round trips -----------------------------------------------------------------------------


def test_writer_and_reader_round_trip(dataset_uri, tiny):
    samples = mixed(tiny)
    write_dir(dataset_uri, tiny, samples, samples_per_shard=3, batch_bytes=200)
    assert manifest_doc(dataset_uri)["format_version"] == FORMAT_VERSION == 4
    r = ShardReader(dataset_uri)
    assert r.manifest.format_version == FORMAT_VERSION
    for s in samples:
        _same(r[s.sample_id], s)
    for got, s in zip(r.read([s.sample_id for s in samples][::-1], threads=2), samples[::-1]):
        _same(got, s)
    for got, s in zip(r, samples):
        _same(got, s)
    batches = list(r.iter_batches())
    assert all(b.schema.equals(schema_for(tiny)) for b in batches)
    col = pa.concat_arrays([b.column("native") for b in batches])
    assert col.null_count == 3  # plain, all-false, plain2
    full = r["m3"].full_routing()
    assert (full[[5, 14]] == -1).all() and (full[6] >= 0).all()


def test_validate_counts_native_rows(dataset_uri, tiny):
    samples = mixed(tiny)
    write_dir(dataset_uri, tiny, samples, samples_per_shard=4)
    report = validate_dataset(dataset_uri)
    assert report.ok, report.faults
    prompt = completion = 0
    for s in samples:
        c = check_routed(s, tiny)
        assert c.ok
        prompt += c.native_by_region["prompt"]
        completion += c.native_by_region["completion"]
    assert report.tally.native.tolist() == [prompt, completion] and prompt and completion
    rows = sum(s.rows for s in samples)
    assert int(report.tally.tokens.sum()) == rows - prompt - completion
    code, doc, _ = run_cli("validate", dataset_uri, "--json")
    assert code == 0 and doc["format_version"] == FORMAT_VERSION
    assert doc["check"]["regions"]["prompt"]["native_rows"] == prompt
    assert doc["check"]["regions"]["completion"]["native_rows"] == completion
    code, _, out = run_cli("validate", dataset_uri)
    assert code == 0 and "native rows" in out


def test_a_stored_native_row_is_checked_by_validate(tmp_path, tiny):
    """validate re-checks with the checks' rule: marked rows skipped, unmarked ones not."""
    s = marked(tiny, "z", 12, (2,))
    s.routed[4, 1] = 0  # an unmarked all-zero block
    write_dir(tmp_path / "d", tiny, [s])
    report = validate_dataset(tmp_path / "d")
    assert not report.ok and report.sample_faults == 1
    (fault,) = report.faults
    assert fault.kind == "routing" and fault.sample_id == "z"
    assert "all_zero" in fault.message and "first at position 4 layer 1" in fault.message


def test_record_batch_hand_off(tiny):
    samples = mixed(tiny)
    batch = to_record_batch(samples, tiny)
    assert batch.schema.equals(schema_for(tiny)) and batch_breaks(batch, tiny) == []
    for got, s in zip(from_record_batch(batch, tiny), samples):
        _same(got, s)
    plain = [s for s in samples if _want(s) is None]
    old = _as_format_2(to_record_batch(plain, tiny))  # format 2: no column, native None
    assert old.schema.equals(schema_for(tiny, 2))
    got = from_record_batch(old, tiny)
    assert [g.native for g in got] == [None] * len(plain)
    for g, s in zip(got, plain):
        _same(g, s)


# ---- hostile values --------------------------------------------------------------------------


def _with_native(batch: pa.RecordBatch, column: pa.Array) -> pa.RecordBatch:
    i = batch.schema.get_field_index("native")
    return batch.set_column(i, pa.field("native", column.type), column)


def test_native_of_the_wrong_length_or_with_nulls_is_refused(tiny):
    samples = mixed(tiny)[:3]
    batch = to_record_batch(samples, tiny)
    rows = samples[0].rows
    for values, said in (([True] * (rows + 1), f"native has {rows + 1} values for {rows} "
                          "routing rows"),
                         ([True] * (rows - 1), f"native has {rows - 1} values for {rows}"),
                         ([True, None] + [False] * (rows - 2), "native holds a null at row 1")):
        bad = _with_native(batch, pa.array([values, None, None], pa.list_(pa.bool_())))
        (b,) = batch_breaks(bad, tiny)
        assert (b.rule, b.row, b.sample_id) == ("routing", 0, "m0") and said in b.message
        with pytest.raises(ShardError, match=r"sample 'm0'.*storage rule 'routing'") as e:
            from_record_batch(bad, tiny)
        assert said in str(e.value)


def test_native_of_the_wrong_type_is_refused(tiny):
    batch = to_record_batch(mixed(tiny)[:2], tiny)
    bad = _with_native(batch, batch.column("native").cast(pa.list_(pa.int8())))
    with pytest.raises(ShardError, match="is not the shard schema"):
        from_record_batch(bad, tiny)


@pytest.mark.parametrize("native, said", [
    (np.zeros(10, bool), "native has 10 values for 11 routing rows"),
    (np.zeros(11, np.int8), "got int8 of shape (11,)"),
    (np.zeros((11, 1), bool), "got bool of shape (11, 1)"),
    ([True] * 11, "got list"),
])
def test_writer_refuses_a_bad_mask(tmp_path, tiny, native, said):
    s = marked(tiny, "bad-mask", 12, mask=False)
    s.native = native
    with pytest.raises(UnstorableSample, match="sample 'bad-mask'") as e:
        write_dir(tmp_path / "d", tiny, [s])
    assert said in str(e.value)
    with pytest.raises(UnstorableSample, match="sample 'bad-mask'"):
        to_record_batch([s], tiny)


def test_hostile_native_column_in_a_dataset(dataset_uri, tiny):
    samples = mixed(tiny)
    write_dir(dataset_uri, tiny, samples, samples_per_shard=8)
    (shard,) = listed_shards(dataset_uri)

    def lengthen(table: pa.Table) -> pa.Table:
        values = table.column("native").to_pylist()
        values[3] = values[3] + [True]  # m3: one value more than its rows
        i = table.schema.get_field_index("native")
        return table.set_column(i, table.schema.field(i), pa.array(values, pa.list_(pa.bool_())))

    rewrite_shard(dataset_uri, shard, lengthen)
    r = ShardReader(dataset_uri)
    with pytest.raises(ShardError, match=r"sample 'm3'.*native has 16 values for 15 routing "
                                         r"rows.*storage rule 'routing'"):
        r["m3"]
    _same(r["m0"], samples[0])  # the other rows stay readable
    report = validate_dataset(dataset_uri)
    assert [(f.kind, f.sample_id) for f in report.faults] == [("storage_rule", "m3")]
    assert "native has 16 values" in report.faults[0].message


def test_native_column_of_another_type_in_a_dataset(dataset_uri, tiny):
    write_dir(dataset_uri, tiny, mixed(tiny), samples_per_shard=8)
    (shard,) = listed_shards(dataset_uri)

    def retype(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("native")
        t = pa.list_(pa.int8())
        return table.set_column(i, pa.field("native", t), table.column(i).cast(t))

    rewrite_shard(dataset_uri, shard, retype)
    report = validate_dataset(dataset_uri)
    assert not report.ok
    assert any(f.file == shard and "native column is list<item: int8>, expected "
               "list<item: bool>" in f.message for f in report.faults), report.faults
    with pytest.raises(ShardError, match="native column is list<item: int8>"):
        ShardReader(dataset_uri, verify=True)


# ---- format 2 ----------------------------------------------------------------------------------


def _as_format_2(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """A format-3 table or batch without native rows as format 2 wrote it: no ``native``
    column, ``format_version`` 2 in the schema metadata."""
    assert data.column("native").null_count == data.num_rows, "native rows: not format 2"
    return with_format_label(data.drop_columns(["native"]), 2)


def make_format_2(uri: Any) -> None:
    """Turn a dataset written without native rows into the format-2 dataset an older
    release wrote: every shard without the column (re-listed, index rows rewritten), every
    manifest saying 2, with format 2's checksums (SHA-256, CRC-32)."""
    for name in listed_shards(uri):
        rewrite_shard(uri, name, _as_format_2)
    for writer in writer_ids(uri):
        set_format_version(uri, 2, writer)


def _shard_schema(uri: Any, name: str) -> pa.Schema:
    return ipc.open_file(pa.py_buffer(read_object(uri, name))).schema


def test_a_format_2_dataset_reads_with_native_none(dataset_uri, tiny):
    samples = [marked(tiny, f"old{i}", 9 + i, seed=i, mask=False) for i in range(7)]
    write_dir(dataset_uri, tiny, samples, samples_per_shard=3)
    make_format_2(dataset_uri)
    for name in listed_shards(dataset_uri):
        schema = _shard_schema(dataset_uri, name)
        assert "native" not in schema.names
        assert json.loads(schema.metadata[b"routing_replay"])["format_version"] == 2
    assert manifest_doc(dataset_uri)["format_version"] == 2
    for verify in ("read", True, False):
        r = ShardReader(dataset_uri, verify=verify)
        assert r.manifest.format_version == 2
        for got, s in zip(r, samples):
            _same(got, s)
        assert [s.native for s in r.read(["old6", "old0"])] == [None, None]
        assert r["old3"].native is None
        for b in r.iter_batches():  # handed out in the current schema: a null native column
            assert b.schema.equals(schema_for(tiny)) and b.column("native").null_count == b.num_rows
    report = validate_dataset(dataset_uri)
    assert report.ok, report.faults
    assert report.to_dict()["format_version"] == 2 and report.samples == 7


def test_appending_to_a_format_2_dataset(dataset_uri, tiny):
    old = [marked(tiny, f"old{i}", 9 + i, seed=i, mask=False) for i in range(4)]
    write_dir(dataset_uri, tiny, old, samples_per_shard=3)
    make_format_2(dataset_uri)
    before = {n: read_object(dataset_uri, n) for n in listed_shards(dataset_uri)}
    (old_writer,) = writer_ids(dataset_uri)
    new = mixed(tiny)
    write_dir(dataset_uri, tiny, new, resume=True, samples_per_shard=3)
    assert {n: read_object(dataset_uri, n) for n in before} == before  # old shards untouched
    versions = {w: manifest_doc(dataset_uri, w)["format_version"] for w in writer_ids(dataset_uri)}
    assert versions.pop(old_writer) == 2 and list(versions.values()) == [FORMAT_VERSION]
    r = ShardReader(dataset_uri, verify=True)
    assert len(r) == len(old) + len(new) and r.manifest.format_version == FORMAT_VERSION
    for s in old + new:
        _same(r[s.sample_id], s)
    assert [s.sample_id for s in r] == [s.sample_id for s in old + new]
    assert all(b.schema.equals(schema_for(tiny)) for b in r.iter_batches())
    report = validate_dataset(dataset_uri)
    assert report.ok, report.faults
    assert Manifest.read(dataset_uri).format_version == FORMAT_VERSION


def test_ingest_append_to_a_format_2_dataset(tmp_path, tiny):
    from replay_bridge.benchmarks.traffic import write_sglang_jsonl

    out = tmp_path / "d"
    write_dir(out, tiny, [marked(tiny, f"old{i}", 9 + i, seed=i, mask=False) for i in range(3)])
    make_format_2(out)
    dump = tmp_path / "dump.jsonl"
    write_sglang_jsonl(dump, tiny, 4, 8, 8)
    code, doc, output = run_cli("ingest", dump, "-m", "tiny-qwen3-moe", "-e", "sglang", "-o", out,
                                "--append", "--json")
    assert code == 0, output
    assert doc["totals"]["stored"] == 4
    assert len(ShardReader(out)) == 7
    assert validate_dataset(out).ok


def test_manifest_and_shard_formats_must_agree(dataset_uri, tiny):
    write_dir(dataset_uri, tiny, mixed(tiny)[:2])
    (shard,) = listed_shards(dataset_uri)
    set_format_version(dataset_uri, 2, shards=False)  # lists a format-4 shard
    report = validate_dataset(dataset_uri)
    assert any(f.file == shard and "format_version 4, its manifest says 2" in f.message
               for f in report.faults), report.faults
    with pytest.raises(ShardError, match="its manifest says 2"):
        ShardReader(dataset_uri, verify=True)


def test_a_format_2_schema_with_a_native_column_is_refused(dataset_uri, tiny):
    write_dir(dataset_uri, tiny, mixed(tiny)[:2])
    (shard,) = listed_shards(dataset_uri)
    rewrite_shard(dataset_uri, shard, lambda t: with_format_label(t, 2))
    set_format_version(dataset_uri, 2)
    report = validate_dataset(dataset_uri)
    assert any("a format-2 schema with a 'native' column" in f.message for f in report.faults)


@pytest.mark.parametrize("version", [1, 5])
def test_unknown_formats_are_refused(dataset_uri, tiny, version):
    write_dir(dataset_uri, tiny, mixed(tiny)[:2])
    edit_manifest(dataset_uri, lambda doc: doc.update(format_version=version))
    with pytest.raises(ShardError, match=f"unsupported format_version {version} "
                                         r"\(this reader knows 2, 3, 4\)"):
        ShardReader(dataset_uri)


def test_external_readers_see_the_native_column(tmp_path, tiny):
    """pyarrow.dataset and Polars read the column; over a dataset appended to since format 2,
    pyarrow.dataset given the format-3 schema reads the old shards' rows with a null one."""
    import polars as pl
    import pyarrow.dataset as ds

    uri = tmp_path / "d"
    write_dir(uri, tiny, [marked(tiny, f"old{i}", 9 + i, seed=i, mask=False) for i in range(3)],
              writer_id="a-old")
    make_format_2(uri)
    samples = mixed(tiny)
    write_dir(uri, tiny, samples, resume=True, writer_id="b-new")
    t = ds.dataset(uri, format="arrow", schema=schema_for(tiny)).to_table()
    assert t.num_rows == 10 and t.column("native").null_count == 3 + 3
    natives = dict(zip(t.column("sample_id").to_pylist(), t.column("native").to_pylist()))
    assert natives["m0"] == samples[0].native.tolist() and natives["old1"] is None
    new = [n for n in listed_shards(uri) if "b-new" in n]
    df = pl.read_ipc(uri / new[0])
    assert df.schema["native"] == pl.List(pl.Boolean)
    assert df.filter(pl.col("sample_id") == "m0")["native"][0].to_list() == [True, True, True] + [
        False] * 10


def test_a_rejected_sample_keeps_its_marks_in_the_quarantine(tmp_path, tiny):
    from replay_bridge.checks import accept
    from replay_bridge.sample import WireSample
    from replay_bridge.shards import ShardWriter, decode_routing

    tokens = np.arange(12, dtype=np.int32)
    routing = np.full((11, tiny.num_layers, tiny.top_k), -1, np.int32)  # nothing but marks...
    native = np.zeros(11, bool)
    native[:10] = True  # ...and one unmarked row of -1: out_of_range
    wire = WireSample("q", tokens, 6, routing=routing, native=native)
    report, routed = accept(wire, tiny)
    assert routed is None and report.kinds == ("out_of_range",)
    assert report.first["out_of_range"] == (10, 0) and report.native_rows == 10
    with ShardWriter(tmp_path / "d", tiny) as w:
        w.quarantine(report, sample=wire)
    (rec,) = ShardReader(tmp_path / "d").quarantined()
    assert rec["sample"]["native"] == list(range(10))
    assert rec["report"]["native_rows"] == 10
    np.testing.assert_array_equal(decode_routing(rec), routing)


def test_one_native_rule_for_a_sample_and_a_record_batch(tiny):
    """The writer's rule (``sample_break``) and the reader's (``batch_breaks``) agree on a
    native mask of the wrong length, and it is the ``routing`` rule, before ``expert_ids``."""
    from replay_bridge.shards._rules import sample_break
    from replay_bridge.shards._schema import to_record_batch as raw_batch

    s = marked(tiny, "n", 12, (1,))
    s.native = np.ones(s.rows + 2, bool)
    s.routed[0, 0, 0] = 200  # out of range too
    broken = sample_break(s, tiny)
    assert broken.rule == "routing"
    assert broken.message == "sample 'n': native has 13 values for 11 routing rows"
    (found,) = batch_breaks(raw_batch([marked(tiny, "ok", 9), s], tiny, schema_for(tiny)), tiny)
    assert (found.row, found.rule, found.message) == (1, "routing", broken.message)


def test_inspect_leaves_native_rows_out_of_the_expert_load(tmp_path, tiny):
    from replay_bridge.inspection import inspect_dataset

    samples = mixed(tiny)
    with ShardWriter(tmp_path / "d", tiny, batch_bytes=1) as w:  # several record batches
        for s in samples:
            w.add(s)
    want = np.zeros((tiny.num_moe_layers, tiny.num_experts), np.int64)
    layer = np.arange(tiny.num_moe_layers)[None, :, None]
    for s in samples:
        keep = s.routed if s.native is None else s.routed[~s.native]
        np.add.at(want, (np.broadcast_to(layer, keep.shape), keep.astype(np.int64)), 1)
    assert sum(s.native_rows for s in samples) > 0  # else the placeholders would not show
    assert (inspect_dataset(tmp_path / "d").load == want).all()
