"""Crafted manifests, symlinks, truncated and corrupted files: clear errors, never a crash,
never a read outside the shard directory."""

from __future__ import annotations

import os

import pytest

from replay_bridge.shards import ShardError, ShardReader

from .helpers import edit_manifest, run_cli, write_dir


@pytest.fixture
def shard_dir(tmp_path, tiny, samples):
    return write_dir(tmp_path / "d", tiny, samples, samples_per_shard=5)


def _set_first_file(name):
    def fn(doc):
        doc["shards"][0]["file"] = name
    return fn


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", "shard-000000.arrow/../../x", "sub/shard-000000.arrow",
    "shard-1.arrow", "", 7, None,
])
def test_manifest_naming_a_file_outside_the_directory_is_refused(shard_dir, name):
    edit_manifest(shard_dir, _set_first_file(name))
    with pytest.raises(ShardError, match="not a .* file inside the shard directory") as e:
        ShardReader(shard_dir)
    assert e.value.kind == "unsafe_path"
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and "inside the shard directory" in doc["error"]


def test_quarantine_entry_outside_the_directory_is_refused(tmp_path, tiny, samples):
    d = tmp_path / "d"
    from replay_bridge.checks import CheckReport
    from replay_bridge.shards import ShardWriter

    with ShardWriter(d, tiny) as w:
        w.add(samples[0])
        w.quarantine(CheckReport("x", kinds=("all_zero",), message="m"))
    edit_manifest(d, lambda doc: doc["quarantine"][0].update(file="../outside.jsonl"))
    with pytest.raises(ShardError, match="outside.jsonl"):
        ShardReader(d)


def test_symlinked_shard_is_refused(shard_dir, tmp_path):
    outside = tmp_path / "outside.arrow"
    os.replace(shard_dir / "shard-000001.arrow", outside)
    os.symlink(outside, shard_dir / "shard-000001.arrow")
    with pytest.raises(ShardError, match="shard-000001.arrow is a symlink"):
        ShardReader(shard_dir)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and "symlink" in doc["error"]


def test_wrong_sha256_is_reported_by_name(shard_dir):
    edit_manifest(shard_dir, lambda doc: doc["shards"][1].update(sha256="0" * 64))
    with pytest.raises(ShardError, match="shard-000001.arrow: sha256 .* does not match"):
        ShardReader(shard_dir)
    reader = ShardReader(shard_dir, verify="lazy")  # the index needs no checksum
    with pytest.raises(ShardError, match="shard-000001.arrow"):
        reader.routing("s007")
    assert reader.routing("s000").shape[1:] == (4, 2)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [("shard-000001.arrow", "checksum")]


@pytest.mark.parametrize("field, value, message", [
    ("rows", 4, r"shard-000000.arrow: holds 5 samples / \d+ tokens, the manifest says 4"),
    ("tokens", 1, r"shard-000000.arrow: holds 5 samples / \d+ tokens, the manifest says 5 / 1"),
])
def test_wrong_per_shard_counts(shard_dir, field, value, message):
    def fn(doc):
        delta = value - doc["shards"][0][field]
        doc["shards"][0][field] = value
        key = "samples" if field == "rows" else field
        doc["totals"][key] += delta
        if field == "rows":
            doc["outcomes"]["stored"] += delta
    edit_manifest(shard_dir, fn)
    with pytest.raises(ShardError, match=message):
        ShardReader(shard_dir)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert {f["kind"] for f in doc["faults"]} == {"counts"}
    assert {f["file"] for f in doc["faults"]} == {"shard-000000.arrow"}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["totals"].update(samples=99), "totals.samples is 99"),
    (lambda d: d["outcomes"].update(stored=3), "outcomes.stored is 3"),
    (lambda d: d["shards"][0].update(rows=-1), "'rows' must be a non-negative integer"),
    (lambda d: d.update(format_version=99), "unsupported format_version 99"),
    (lambda d: d.update(format_version=True), "unsupported format_version True"),
    (lambda d: d.update(format_version=1.0), "unsupported format_version 1.0"),
    (lambda d: d["shards"].append(dict(d["shards"][0])), "lists a file twice"),
    (lambda d: d.update(geometry={"num_layers": 4}), "bad geometry"),
    (lambda d: d["geometry"].update(id_dtype="not-a-dtype"), "bad geometry"),
    (lambda d: d["geometry"].update(moe_layers="xyz"), "bad geometry"),
])
def test_inconsistent_manifest_is_refused(shard_dir, edit, message):
    edit_manifest(shard_dir, edit)
    with pytest.raises(ShardError, match=message):
        ShardReader(shard_dir)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and message.split()[0].strip("'") in doc["error"]


def test_geometry_mismatch_between_manifest_and_shard(shard_dir):
    def fn(doc):
        doc["geometry"]["num_experts"] = 16
    edit_manifest(shard_dir, fn)
    with pytest.raises(ShardError, match="shard-000000.arrow schema geometry and manifest "
                       "geometry differ: num_experts: 16 vs 8") as e:
        ShardReader(shard_dir)
    assert e.value.kind == "geometry"
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert {f["kind"] for f in doc["faults"]} == {"geometry"}
    assert len(doc["faults"]) == 3  # every shard named


def test_truncated_shard_reported_by_name(shard_dir):
    p = shard_dir / "shard-000001.arrow"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-000001.arrow: \d+ bytes, the manifest says "
                       r"\d+ \(truncated\)"):
        ShardReader(shard_dir)
    code, doc, out = run_cli("validate", shard_dir, "--json")
    assert code == 1
    kinds = {(f["file"], f["kind"]) for f in doc["faults"]}
    assert ("shard-000001.arrow", "size") in kinds
    assert ("shard-000001.arrow", "unreadable") in kinds
    assert doc["shards"] == {"listed": 3, "bad": 1}
    assert doc["samples"] == 7  # the other two shards were still checked
    code, _, out = run_cli("validate", shard_dir)
    assert code == 1 and "shard-000001.arrow" in out and "faults found" in out


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_corrupted_shard_reported_by_name(tmp_path, tiny, samples, compression):
    d = write_dir(tmp_path / "d", tiny, samples, samples_per_shard=5, compression=compression)
    p = d / "shard-000002.arrow"
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xA5
    p.write_bytes(bytes(data))
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 1
    assert all(f["file"] == "shard-000002.arrow" for f in doc["faults"])
    assert "checksum" in {f["kind"] for f in doc["faults"]}
    with pytest.raises(ShardError, match="shard-000002.arrow"):
        ShardReader(d)
    # without checksums the reader still never crashes: an error or (flipped ids) data
    try:
        r = ShardReader(d, verify=False)
        for _ in r:
            pass
    except ShardError as e:
        assert e.file == "shard-000002.arrow"


def test_missing_shard_and_garbage_manifest(shard_dir):
    (shard_dir / "shard-000000.arrow").unlink()
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1 and doc["faults"][0]["kind"] == "missing"
    with pytest.raises(ShardError, match="shard-000000.arrow: listed in the manifest but missing"):
        ShardReader(shard_dir)
    (shard_dir / "manifest.json").write_bytes(b"{not json")
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 2 and "not valid JSON" in doc["error"]


def test_not_a_shard_directory(tmp_path):
    code, doc, _ = run_cli("validate", tmp_path, "--json")
    assert code == 2 and "not a shard directory" in doc["error"]
    code, doc, _ = run_cli("validate", tmp_path / "nope", "--json")
    assert code == 2
    code, doc, _ = run_cli("inspect", tmp_path, "--json")
    assert code == 2 and "not a shard directory" in doc["error"]


def _rewrite_shard(d, name, fn):
    """Replace a shard by a table edited with plain pyarrow; keep the manifest consistent so
    only the contents are wrong."""
    import hashlib

    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = d / name
    with ipc.open_file(pa.memory_map(str(path))) as f:
        table = f.read_all()
    table = fn(table)
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    data = path.read_bytes()

    def fix(doc):
        e = next(e for e in doc["shards"] if e["file"] == name)
        doc["totals"]["bytes"] += len(data) - e["bytes"]
        e.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    edit_manifest(d, fix)


@pytest.mark.parametrize("column, value, message", [
    ("weight_versions", "{not json", "malformed row"),
    ("prompt_len", None, "malformed row"),
])
def test_malformed_values_in_a_shard(shard_dir, column, value, message):
    import pyarrow as pa

    def fn(table):
        i = table.schema.get_field_index(column)
        col = table.column(i).to_pylist()
        col[1] = value
        field = table.schema.field(i).with_nullable(True)
        return table.set_column(i, field, pa.array(col, field.type)).replace_schema_metadata(
            table.schema.metadata)
    _rewrite_shard(shard_dir, "shard-000001.arrow", fn)
    r = ShardReader(shard_dir)
    with pytest.raises(ShardError, match=f"shard-000001.arrow: {message}"):
        r["s006"]
    assert r["s005"].sample_id == "s005"
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [("shard-000001.arrow", "unreadable")]


def test_routing_not_a_whole_number_of_rows(shard_dir):
    import pyarrow as pa

    def fn(table):
        i = table.schema.get_field_index("routed")
        col = table.column(i).to_pylist()
        col[0] = col[0][:-1]
        return table.set_column(i, table.schema.field(i), pa.array(col, table.schema.field(i).type))
    _rewrite_shard(shard_dir, "shard-000000.arrow", fn)
    r = ShardReader(shard_dir)
    with pytest.raises(ShardError, match=r"shard-000000.arrow: sample 's000' has \d+ routing ids"):
        r.routing("s000")
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1 and doc["faults"][0]["file"] == "shard-000000.arrow"


def test_empty_shard_file_with_matching_manifest_is_read(shard_dir):
    """A crafted, schema-valid shard without rows: no crash, just no samples from it."""
    _rewrite_shard(shard_dir, "shard-000001.arrow", lambda t: t.slice(0, 0))

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
        list(r.quarantined())
    except ShardError as e:
        assert str(e)
    try:
        validate_dir(d)
    except ShardError as e:
        assert str(e)


@pytest.fixture(scope="module")
def fuzz_src(tmp_path_factory):
    from replay_bridge.geometry import RoutingGeometry

    from .conftest import make_sample
    g = RoutingGeometry.from_preset("tiny-qwen3-moe")
    out = {}
    for comp in ("zstd", "none"):
        d = tmp_path_factory.mktemp("fuzz") / comp
        write_dir(d, g, [make_sample(g, f"s{i}", 30, seed=i) for i in range(6)],
                  samples_per_shard=3, batch_bytes=100, compression=comp)
        out[comp] = d
    return out


@_FUZZ
@given(comp=st.sampled_from(["zstd", "none"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=6))
def test_fuzzed_shard_bytes(tmp_path_factory, fuzz_src, comp, flips):
    import shutil
    d = tmp_path_factory.mktemp("f") / "d"
    shutil.copytree(fuzz_src[comp], d)
    p = d / "shard-000000.arrow"
    data = bytearray(p.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    p.write_bytes(bytes(data))
    _read_everything(d)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=3),
                     max_leaves=6)


@_FUZZ
@given(path=st.lists(st.sampled_from(["shards", 0, 1, "file", "rows", "tokens", "bytes",
                                      "geometry", "moe_layers", "top_k", "totals", "outcomes",
                                      "quarantine", "sha256", "format_version"]),
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
    names the shard (exit 1), the reader and inspect refuse it (exit 2), nothing allocates."""
    import json

    def fn(table):
        meta = dict(table.schema.metadata)
        doc = json.loads(meta[b"routing_replay"])
        doc[key] = value
        meta[b"routing_replay"] = json.dumps(doc).encode()
        return table.replace_schema_metadata(meta)
    _rewrite_shard(shard_dir, "shard-000001.arrow", fn)
    with pytest.raises(ShardError, match=f"shard-000001.arrow: bad 'routing_replay' schema "
                       f"metadata: {key} must be"):
        ShardReader(shard_dir)
    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [("shard-000001.arrow",
                                                                 "unreadable")]
    assert doc["samples"] == 7  # the other shards still checked
    code, doc, _ = run_cli("inspect", shard_dir, "--json")
    assert code == 2 and "shard-000001.arrow" in doc["error"] and key in doc["error"]
