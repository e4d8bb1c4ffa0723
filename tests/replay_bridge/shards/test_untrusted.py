"""Crafted manifests and indexes, symlinks, truncated and corrupted objects: clear errors, never a
crash, never a read outside the dataset. Every writer's manifest and compact index is untrusted
input. On a local directory and, where storage matters, on an S3-compatible server."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from replay_bridge.shards import ShardError, ShardReader, ShardWriter

from .helpers import (BLOCK_CHECKSUM, DIGEST, INDEX_DIR, WRITER, corrupt_batch, delete_object,
                      edit_index, edit_manifest, flip_bytes, index_of, local_path, manifest_name,
                      manifest_of, read_object, relist, rewrite_shard, run_cli, shard_name,
                      write_dir, write_object)

S0, S1, S2 = (shard_name(WRITER, i) for i in range(3))


@pytest.fixture
def shard_dir(tmp_path, tiny, samples):
    return write_dir(tmp_path / "d", tiny, samples, samples_per_shard=5)


@pytest.fixture
def dataset(dataset_uri, tiny, samples):
    """12 samples in 3 shards (5, 5, 2) of writer :data:`WRITER`, local or on S3."""
    return write_dir(dataset_uri, tiny, samples, samples_per_shard=5)


def _set_first_file(name):
    def fn(doc):
        doc["shards"][0]["file"] = name
    return fn


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", f"{S0}/../../x", f"sub/{S0}", "part-w0-1.arrow",
    "shard-000000.arrow", "part-other-000000.arrow", f"{INDEX_DIR}/w0-000000.arrow",
    manifest_name(WRITER), f"_routing_replay/../{S0}", "", 7, None,
])
def test_manifest_naming_an_object_not_its_own_is_refused(shard_dir, name):
    """Only the format's names of the manifest's own writer: nothing outside the dataset, no
    other writer's object, no folder, no index or manifest listed as a shard. (A manifest is
    parsed the same whatever the store: local only; the S3 cases below.)"""
    edit_manifest(shard_dir, _set_first_file(name))
    with pytest.raises(ShardError, match="which is not a .* object of writer 'w0'") as e:
        ShardReader(shard_dir)
    assert e.value.kind == "unsafe_path"
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and "is not a" in doc["error"]


@pytest.mark.parametrize("entry", ["quarantine", "index"])
def test_quarantine_or_index_entry_outside_the_dataset_is_refused(dataset_uri, tiny, samples,
                                                                 entry):
    from replay_bridge.checks import CheckReport

    with ShardWriter(dataset_uri, tiny, writer_id=WRITER) as w:
        w.add(samples[0])
        w.quarantine(CheckReport("x", kinds=("all_zero",), message="m"))

    def fn(doc):
        (doc["quarantine"][0] if entry == "quarantine" else doc["index"]).update(
            file="../outside.jsonl")
    edit_manifest(dataset_uri, fn)
    with pytest.raises(ShardError, match="outside.jsonl") as e:
        ShardReader(dataset_uri)
    assert e.value.kind == "unsafe_path"


def test_a_manifest_under_another_writers_name_is_refused(dataset):
    """A manifest copied under another writer's name (or naming another writer) is refused:
    each writer publishes only its own objects."""
    write_object(dataset, manifest_name("w1"), read_object(dataset, manifest_name(WRITER)))
    with pytest.raises(ShardError, match="writer 'w0' does not match its name"):
        ShardReader(dataset)
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 2 and "does not match its name" in doc["error"]


def test_a_file_in_the_manifest_folder_that_is_no_manifest_name_is_ignored(dataset):
    write_object(dataset, "_routing_replay/manifests/not a writer.json", b"{garbage")
    assert len(ShardReader(dataset)) == 12
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 0
    assert any("not a writer.json: not a manifest name" in x for x in doc["warnings"])


def test_symlinked_shard_is_refused(shard_dir, tmp_path):
    outside = tmp_path / "outside.arrow"
    os.replace(local_path(shard_dir, S1), outside)
    os.symlink(outside, local_path(shard_dir, S1))
    r = ShardReader(shard_dir)  # opening reads manifests and indexes only
    assert r["s000"].sample_id == "s000"
    with pytest.raises(ShardError, match=f"{S1} is a symlink") as e:
        r["s005"]
    assert e.value.kind == "unsafe_path"
    with pytest.raises(ShardError, match=f"{S1} is a symlink"):
        ShardReader(shard_dir, verify=True)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert (S1, "unsafe_path") in {(f["file"], f["kind"]) for f in doc["faults"]}
    assert any("symlink" in f["message"] for f in doc["faults"])


def test_wrong_digest_is_reported_by_name(dataset):
    edit_manifest(dataset, lambda doc: doc["shards"][1].update({DIGEST: "0" * 32}))
    with pytest.raises(ShardError, match=f"{S1}: {DIGEST} .* does not match") as e:
        ShardReader(dataset, verify=True)
    assert e.value.kind == "checksum"
    reader = ShardReader(dataset)  # the default checks each record batch's checksum instead
    assert reader.routing("s007").shape[1:] == (4, 2)
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [(S1, "checksum")]


@pytest.mark.parametrize("field, value, message", [
    ("rows", 4, rf"{S0}: its index lists 5 samples / \d+ tokens, the manifest says 4"),
    ("tokens", 1, rf"{S0}: its index lists 5 samples / \d+ tokens, the manifest says 5 / 1"),
])
def test_wrong_per_shard_counts(dataset, field, value, message):
    def fn(doc):
        delta = value - doc["shards"][0][field]
        doc["shards"][0][field] = value
        key = "samples" if field == "rows" else field
        doc["totals"][key] += delta
        if field == "rows":
            doc["outcomes"]["stored"] += delta
    edit_manifest(dataset, fn)
    with pytest.raises(ShardError, match=message) as e:
        ShardReader(dataset)
    assert e.value.kind == "counts"
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1
    assert {f["kind"] for f in doc["faults"]} == {"counts"}
    assert {f["file"] for f in doc["faults"]} == {S0}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["totals"].update(samples=99), "totals.samples is 99"),
    (lambda d: d["outcomes"].update(stored=3), "outcomes.stored is 3"),
    (lambda d: d["shards"][0].update(rows=-1), "'rows' must be a non-negative integer"),
    (lambda d: d.update(format_version=99), "unsupported format_version 99"),
    (lambda d: d.update(format_version=True), "unsupported format_version True"),
    (lambda d: d.update(format_version=1.0), "unsupported format_version 1.0"),
    (lambda d: d.update(format_version=1), "unsupported format_version 1"),
    (lambda d: d["shards"].append(dict(d["shards"][0])), "lists an object twice"),
    (lambda d: d.update(geometry={"num_layers": 4}), "bad geometry"),
    (lambda d: d["geometry"].update(id_dtype="not-a-dtype"), "bad geometry"),
    (lambda d: d["geometry"].update(moe_layers="xyz"), "bad geometry"),
    (lambda d: d.update(writer="w1"), "writer 'w1' does not match its name"),
    (lambda d: d.update(format="something-else"), "not a routing-replay-dataset manifest"),
    (lambda d: d.update(index=None), "lists objects but no index"),
    (lambda d: d["index"].update(rows=3), "the index has 3 rows for 12 samples"),
    (lambda d: d["index"].update({DIGEST: "0" * 32}), f"{DIGEST} does not match"),
    (lambda d: d["index"].update(bytes=1), f"{DIGEST} does not match"),
    (lambda d: d["index"].update({DIGEST: "0" * 64}), f"bad {DIGEST} '0000"),
    (lambda d: d["index"].pop(DIGEST), f"bad {DIGEST} None"),
])
def test_inconsistent_manifest_is_refused(shard_dir, edit, message):
    edit_manifest(shard_dir, edit)
    with pytest.raises(ShardError, match=message):
        ShardReader(shard_dir)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and message.split()[0].strip("'") in doc["error"]


def _shard_column(t: pa.Table, fn) -> pa.Table:
    i = t.schema.get_field_index("shard")
    return t.set_column(i, t.schema.field(i), pa.array(fn(t.column("shard").to_numpy()),
                                                       pa.int32()))


@pytest.mark.parametrize("what", ["not arrow", "wrong rows", "shard out of range",
                                  "negative offset", "wrong schema"])
def test_an_untrustworthy_index_is_refused_by_name(dataset, what):
    """The compact index is untrusted too: not an Arrow file, a row count other than the
    manifest's, a shard number the manifest does not list, a negative byte offset, another
    schema."""
    name = index_of(dataset)
    if what == "not arrow":
        write_object(dataset, name, b"not an index")
        relist(dataset, name)
        message = "not a readable index"
    elif what == "wrong rows":
        edit_index(dataset, lambda t: t.slice(1))
        edit_manifest(dataset, lambda d: d["index"].update(rows=12))
        message = "11 rows, the manifest says 12"
    elif what == "shard out of range":
        edit_index(dataset, lambda t: _shard_column(t, lambda s: s + 3))
        message = "names a shard the manifest does not list"
    elif what == "negative offset":
        def edit(t):
            i = t.schema.get_field_index("offset")
            return t.set_column(i, t.schema.field(i), pa.array(t.column(i).to_numpy() - 2**40))
        edit_index(dataset, edit)
        message = "negative offset"
    else:
        import pyarrow.ipc as ipc

        from .helpers import read_index
        table = read_index(dataset).drop_columns([BLOCK_CHECKSUM])
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        write_object(dataset, name, sink.getvalue().to_pybytes())
        relist(dataset, name)
        message = "index schema"
    with pytest.raises(ShardError, match=f"{name}: .*{message}|{message}") as e:
        ShardReader(dataset)
    if what == "negative offset":
        assert e.value.kind == "index"
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 2 and name in doc["error"]


@pytest.mark.parametrize("what", ["crc", "offset", "past the end", "length", "order",
                                  "row past the batch"])
def test_an_index_pointing_at_the_wrong_bytes_is_caught(dataset, what):
    """An index consistent with its manifest whose byte ranges, checksums or rows are wrong: the
    reader refuses the record batch by name (never returns other bytes as that sample), and
    validate names the shard."""
    def edit(t):
        first = pc.equal(t.column("shard"), 1).to_numpy(zero_copy_only=False)
        col = {"crc": BLOCK_CHECKSUM, "offset": "offset", "past the end": "offset",
               "length": "length", "order": "row", "row past the batch": "row"}[what]
        i = t.schema.get_field_index(col)
        values = t.column(i).to_numpy().copy()
        if what == "crc":
            values[first] ^= 1
        elif what == "offset":
            values[first] += 8
        elif what == "past the end":
            values[first] += 2**40
        elif what == "row past the batch":
            values[first] += 100
        elif what == "length":
            values[first] = values[first] + 10**6
        else:
            values[first] = values[first][::-1]
        return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))
    edit_index(dataset, edit)
    r = ShardReader(dataset)
    assert r["s000"].sample_id == "s000"
    if what == "order":  # the bytes are right, the rows swapped: validate's cross-check
        assert r["s005"].sample_id == "s009"
    else:
        with pytest.raises(ShardError, match=S1) as e:
            r["s005"]
        assert e.value.kind in ("checksum", "size", "index")
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1
    assert {f["file"] for f in doc["faults"]} == {S1}
    assert {f["kind"] for f in doc["faults"]} <= {"checksum", "index"}, doc["faults"]


def test_writers_whose_geometries_differ(dataset_uri, tiny, samples):
    write_dir(dataset_uri, tiny, samples[:2])
    with ShardWriter(dataset_uri, tiny, resume=True, writer_id="w1") as w:
        w.add(samples[2])
    edit_manifest(dataset_uri, lambda d: d["geometry"].update(num_experts=16), "w1")
    with pytest.raises(ShardError, match="writer w1 and writer w0") as e:
        ShardReader(dataset_uri)
    assert e.value.kind == "geometry"
    code, doc, _ = run_cli("validate", dataset_uri, "--json")
    assert code == 2 and "num_experts" in doc["error"]


def test_geometry_mismatch_between_manifest_and_shard(dataset):
    """The reader decodes record batches with the manifest's geometry without opening a
    shard's footer; verify=True and validate compare every shard's own schema with it."""
    edit_manifest(dataset, lambda doc: doc["geometry"].update(num_experts=16))
    with pytest.raises(ShardError, match=f"{S0} schema geometry and manifest geometry differ: "
                       "num_experts: 16 vs 8") as e:
        ShardReader(dataset, verify=True)
    assert e.value.kind == "geometry"
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1
    assert {f["kind"] for f in doc["faults"]} == {"geometry"}
    assert len(doc["faults"]) == 3  # every shard named


def test_truncated_shard_reported_by_name(dataset):
    write_object(dataset, S1, read_object(dataset, S1)[: len(read_object(dataset, S1)) // 2])
    r = ShardReader(dataset)
    with pytest.raises(ShardError, match=rf"{S1}: \d+ bytes, the manifest says \d+ "
                       r"\(truncated\)") as e:
        r["s005"]
    assert e.value.kind == "size"
    assert r["s000"].sample_id == "s000"
    with pytest.raises(ShardError, match=rf"{S1}: \d+ bytes.*\(truncated\)"):
        ShardReader(dataset, verify=True)
    code, doc, out = run_cli("validate", dataset, "--json")
    assert code == 1
    kinds = {(f["file"], f["kind"]) for f in doc["faults"]}
    assert (S1, "size") in kinds
    assert (S1, "unreadable") in kinds
    assert doc["shards"] == {"listed": 3, "bad": 1}
    assert doc["samples"] == 7  # the other two shards were still checked
    code, _, out = run_cli("validate", dataset)
    assert code == 1 and S1 in out and "faults found" in out


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_corrupted_shard_reported_by_name(dataset_uri, tiny, samples, compression):
    """Bytes flipped in an object (overwritten in place, on S3 too): the record batch's checksum
    catches it on first read, the object digest on open with verify=True, validate names the
    shard."""
    d = write_dir(dataset_uri, tiny, samples, samples_per_shard=5, compression=compression)
    corrupt_batch(d, S2, 0)
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 1
    assert all(f["file"] == S2 for f in doc["faults"])
    assert "checksum" in {f["kind"] for f in doc["faults"]}
    with pytest.raises(ShardError, match=S2):
        ShardReader(d, verify=True)
    r = ShardReader(d)
    assert r["s009"].sample_id == "s009"
    with pytest.raises(ShardError, match=f"{S2}: record batch 0 .* {BLOCK_CHECKSUM}") as e:
        r["s010"]
    assert e.value.kind == "checksum"
    # without checksums the reader still never crashes: an error or (flipped ids) data
    try:
        r = ShardReader(d, verify=False)
        for _ in r:
            pass
    except ShardError as e:
        assert e.file == S2


def test_corrupted_footer_is_found_by_digest_and_validate(dataset):
    """Bytes flipped outside every record batch (the footer): no read of a sample needs them,
    so only the whole-object checks see it."""
    data = read_object(dataset, S1)
    flip_bytes(dataset, S1, start=(len(data) - 20) / len(data), count=4)
    assert ShardReader(dataset)["s005"].sample_id == "s005"
    with pytest.raises(ShardError, match=f"{S1}: {DIGEST}"):
        ShardReader(dataset, verify=True)
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1 and (S1, "checksum") in {(f["file"], f["kind"]) for f in doc["faults"]}


def test_missing_shard_and_garbage_manifest(dataset):
    delete_object(dataset, S0)
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1 and doc["faults"][0]["kind"] == "missing"
    with pytest.raises(ShardError, match=f"{S0}: listed in the manifest but missing"):
        ShardReader(dataset, verify=True)
    with pytest.raises(ShardError, match=f"{S0}: missing") as e:
        ShardReader(dataset)["s000"]
    assert e.value.kind == "missing"
    write_object(dataset, manifest_of(dataset), b"{not json")
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 2 and "not valid JSON" in doc["error"]


def test_missing_index_is_refused_by_name(dataset):
    name = index_of(dataset)
    delete_object(dataset, name)
    with pytest.raises(ShardError, match=f"{name}: missing"):
        ShardReader(dataset)
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 2 and name in doc["error"]


def test_not_a_dataset(tmp_path, dataset_uri):
    code, doc, _ = run_cli("validate", tmp_path, "--json")
    assert code == 2 and "not a routing-replay dataset" in doc["error"]
    code, doc, _ = run_cli("validate", dataset_uri, "--json")  # nothing written there
    assert code == 2 and "not a routing-replay dataset" in doc["error"]
    code, doc, _ = run_cli("validate", tmp_path / "nope", "--json")
    assert code == 2
    code, doc, _ = run_cli("inspect", tmp_path, "--json")
    assert code == 2 and "not a routing-replay dataset" in doc["error"]


def test_a_format_1_directory_is_named_as_such(tmp_path, tiny):
    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    (d / "shard-000000.arrow").write_bytes(b"ARROW1")
    for fn in (ShardReader, lambda d: ShardWriter(d, tiny, resume=True)):
        with pytest.raises(ShardError, match="format-1 shard directory"):
            fn(d)
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 2 and "format-1" in doc["error"]


def _rewrite_shard(d, name, fn):
    """Replace a shard by a table edited with plain pyarrow; keep the manifest and index
    consistent so only the contents are wrong."""
    rewrite_shard(d, name, fn)


@pytest.mark.parametrize("column, value, message", [
    ("weight_versions", "{not json", "malformed row"),
    ("prompt_len", None, "malformed row"),
])
def test_malformed_values_in_a_shard(dataset, column, value, message):
    def fn(table):
        i = table.schema.get_field_index(column)
        col = table.column(i).to_pylist()
        col[1] = value
        field = table.schema.field(i).with_nullable(True)
        return table.set_column(i, field, pa.array(col, field.type)).replace_schema_metadata(
            table.schema.metadata)
    _rewrite_shard(dataset, S1, fn)
    r = ShardReader(dataset)
    with pytest.raises(ShardError, match=f"{S1}: {message}"):
        r["s006"]
    assert r["s005"].sample_id == "s005"
    code, doc, _ = run_cli("validate", dataset, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [(S1, "unreadable")]


def test_routing_not_a_whole_number_of_rows(shard_dir):
    def fn(table):
        i = table.schema.get_field_index("routed")
        col = table.column(i).to_pylist()
        col[0] = col[0][:-1]
        return table.set_column(i, table.schema.field(i), pa.array(col, table.schema.field(i).type))
    _rewrite_shard(shard_dir, S0, fn)
    r = ShardReader(shard_dir)
    with pytest.raises(ShardError, match=rf"{S0}: sample 's000' has \d+ routing ids"):
        r.routing("s000")
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1 and doc["faults"][0]["file"] == S0


def test_empty_shard_file_with_matching_manifest_is_read(shard_dir):
    """A crafted, schema-valid shard without rows (its index rows gone too): no crash, just no
    samples from it."""
    _rewrite_shard(shard_dir, S1, lambda t: t.slice(0, 0))

    def fix(doc):
        e = doc["shards"][1]
        doc["totals"]["samples"] -= e["rows"]
        doc["outcomes"]["stored"] -= e["rows"]
        doc["totals"]["tokens"] -= e["tokens"]
        doc["totals"]["routed_rows"] -= e["routed_rows"]
        e.update(rows=0, tokens=0, routed_rows=0)
    edit_manifest(shard_dir, fix)
    r = ShardReader(shard_dir)
    assert len(r) == 7 and "s005" not in r
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 0, doc["faults"]


# ---- fuzzing: whatever the bytes, a ShardError or data, never another exception ---------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from replay_bridge.shards import validate_dir  # noqa: E402

_FUZZ = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_everything(d):
    try:
        r = ShardReader(d, verify=False)
        for _ in r:
            pass
        for sid in r.sample_ids():
            r.routing(sid)
            r[sid]
        r.read(r.sample_ids()[::-1])
        list(r.quarantined())
    except ShardError as e:
        assert str(e)
    try:
        validate_dir(d)
    except ShardError as e:
        assert str(e)


@pytest.fixture(scope="module")
def fuzz_src(tmp_path_factory):
    from replay_bridge.checks import CheckReport
    from replay_bridge.geometry import RoutingGeometry

    from .conftest import make_sample
    g = RoutingGeometry.from_preset("tiny-qwen3-moe")
    out = {}
    for comp in ("zstd", "none"):
        d = tmp_path_factory.mktemp("fuzz") / comp
        with ShardWriter(d, g, samples_per_shard=3, batch_bytes=100, compression=comp,
                         writer_id=WRITER) as w:
            for i in range(6):
                w.add(make_sample(g, f"s{i}", 30, seed=i))
            w.quarantine(CheckReport("bad", kinds=("all_zero",), message="zeros"))
        out[comp] = d
    return out


@_FUZZ
@given(comp=st.sampled_from(["zstd", "none"]), target=st.sampled_from(["shard", "index"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=6))
def test_fuzzed_shard_and_index_bytes(tmp_path_factory, fuzz_src, comp, target, flips):
    import shutil
    d = tmp_path_factory.mktemp("f") / "d"
    shutil.copytree(fuzz_src[comp], d)
    p = local_path(d, S0 if target == "shard" else index_of(d))
    data = bytearray(p.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    p.write_bytes(bytes(data))
    if target == "index":  # listed as it now is: only its contents are hostile
        relist(d, index_of(d))
    _read_everything(d)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=3),
                     max_leaves=6)


@_FUZZ
@given(path=st.lists(st.sampled_from(["shards", 0, 1, "file", "rows", "tokens", "bytes",
                                      "geometry", "moe_layers", "top_k", "totals", "outcomes",
                                      "quarantine", DIGEST, "format_version", "index",
                                      "writer", "started"]),
                     min_size=1, max_size=3),
       value=_JSON)
def test_fuzzed_manifest_values(tmp_path_factory, fuzz_src, path, value):
    import shutil
    d = tmp_path_factory.mktemp("m") / "d"
    shutil.copytree(fuzz_src["zstd"], d)

    def fn(doc):
        node = doc
        for key in path[:-1]:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return
        try:
            node[path[-1]] = value
        except (IndexError, TypeError):
            pass
    edit_manifest(d, fn)
    _read_everything(d)


@pytest.mark.parametrize("key, value", [("num_layers", 10**13), ("num_experts", 10**30),
                                        ("top_k", 2**20), ("moe_layers", "0123"),
                                        ("num_layers", "4")])
def test_absurd_geometry_in_a_shard_schema(shard_dir, key, value):
    """A consistent rewrite whose only fault is the shard schema's geometry metadata: validate
    names the shard (exit 1), the reader with verify=True refuses it by name, nothing
    allocates; the default reader decodes record batches with the manifest's geometry."""
    import json

    def fn(table):
        meta = dict(table.schema.metadata)
        doc = json.loads(meta[b"routing_replay"])
        doc[key] = value
        meta[b"routing_replay"] = json.dumps(doc).encode()
        return table.replace_schema_metadata(meta)
    _rewrite_shard(shard_dir, S1, fn)
    with pytest.raises(ShardError, match=f"{S1}: bad 'routing_replay' schema "
                       f"metadata: {key} must be"):
        ShardReader(shard_dir, verify=True)
    assert ShardReader(shard_dir)["s005"].sample_id == "s005"
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [(S1, "unreadable")]
    assert doc["samples"] == 7  # the other shards still checked

