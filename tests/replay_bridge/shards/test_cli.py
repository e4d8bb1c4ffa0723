"""``validate``, ``inspect`` and ``bench shards`` on the command line: exit codes, JSON shape,
the figures they print (``validate`` on a local directory and on an S3-compatible server)."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardReader, ShardWriter

from .helpers import (WRITER, edit_index, edit_manifest, is_local, listed_chunks, local_path,
                      read_object, run_cli, shard_name, shard_objects, temp_name, write_dir,
                      write_object)


def test_validate_clean_directory(dataset_uri, tiny, samples):
    d = dataset_uri
    with ShardWriter(d, tiny, samples_per_shard=5) as w:
        for s in samples:
            w.add(s)
        w.quarantine(CheckReport("bad-1", kinds=("all_zero",), message="zeros"))
        w.record_failure("lost-1", "connection reset")
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["faults"] == []
    assert doc["samples"] == len(samples)
    assert doc["tokens"] == sum(s.num_tokens for s in samples)
    assert doc["shards"] == {"listed": 3, "bad": 0}
    assert doc["quarantine"] == {"files": 1, "records": 2,
                                 "outcomes": {"rejected": 1, "failed": 1}}
    assert doc["manifest"]["outcomes"] == {"stored": 12, "rejected": 1, "failed": 1}
    check = doc["check"]
    assert check["samples"] == 12 and check["good"] == 12 and check["rejected"] == 0
    rows = sum(s.rows for s in samples)
    prompt_rows = sum(min(s.prompt_len, s.rows) for s in samples)
    assert check["regions"]["prompt"]["tokens"] == prompt_rows
    assert check["regions"]["completion"]["tokens"] == rows - prompt_rows
    assert check["regions"]["prompt"]["blocks"] == prompt_rows * tiny.num_moe_layers
    code, _, out = run_cli("validate", d)
    assert code == 0 and "clean" in out and "completion" in out


def test_validate_finds_bad_stored_routing_by_region_and_layer(tmp_path, tiny, samples):
    s = samples[4]  # 20 tokens, prompt 10
    s.routed[2, 1] = 0          # prompt position 2, MoE layer 1: all-zero block
    s.routed[15, 3] = [5, 5]    # completion position 15, layer 3: duplicate ids
    d = write_dir(tmp_path / "d", tiny, samples, samples_per_shard=5)
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 1 and doc["ok"] is False and doc["sample_faults"] == 1
    (fault,) = doc["faults"]
    assert fault["kind"] == "routing" and fault["sample_id"] == "s004"
    assert fault["file"] == shard_name(WRITER, 0)
    assert "all_zero" in fault["message"] and "position 2 layer 1" in fault["message"]
    check = doc["check"]
    assert check["by_kind"] == {"all_zero": 1, "duplicate_ids": 1}
    assert check["regions"]["prompt"]["bad_blocks"] == 1
    assert check["regions"]["prompt"]["all_zero_blocks"] == 1
    assert check["regions"]["completion"]["bad_blocks"] == 1
    assert check["regions"]["completion"]["all_zero_blocks"] == 0
    assert check["layers"] == {"1": {"bad_blocks": [1, 0], "all_zero_blocks": [1, 0]},
                               "3": {"bad_blocks": [0, 1], "all_zero_blocks": [0, 0]}}
    code, _, out = run_cli("validate", d)
    assert code == 1 and "layer 1" in out and "s004" in out


def test_validate_finds_ids_stored_twice_across_shards(dataset_uri, tiny, samples):
    """One writer's manifest lists a copy of its first shard as a third one (its index rows
    too): validate names every id stored twice; the reader reads the first copy only."""
    d = write_dir(dataset_uri, tiny, samples[:4], samples_per_shard=2)
    first, copy = shard_name(WRITER, 0), shard_name(WRITER, 2)
    write_object(d, copy, read_object(d, first))

    def fn(doc):
        doc["shards"].append(dict(doc["shards"][0], file=copy))
        doc["totals"]["shards"] += 1
        for k in ("samples", "tokens", "routed_rows", "bytes"):
            doc["totals"][k] += doc["shards"][0]["rows" if k == "samples" else k]
        doc["outcomes"]["stored"] += doc["shards"][0]["rows"]
    edit_manifest(d, fn)

    def index(t):
        rows = t.filter(pc.equal(t.column("shard"), 0))
        i = rows.schema.get_field_index("shard")
        rows = rows.set_column(i, rows.schema.field(i), pa.array([2] * rows.num_rows, pa.int32()))
        return pa.concat_tables([t, rows])
    edit_index(d, index)
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 1
    dups = [f for f in doc["faults"] if f["kind"] == "duplicate_id"]
    assert [f["sample_id"] for f in dups] == ["s000", "s001"]
    assert dups[0]["file"] == copy and "stored twice" in dups[0]["message"]
    assert [(x["sample_id"], x["read"], x["ignored"]) for x in doc["duplicates"]] == [
        ("s000", first, copy), ("s001", first, copy)]
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == ["s000", "s001", "s002", "s003"]
    assert r.duplicates == [("s000", first, copy), ("s001", first, copy)]


def test_validate_reports_unreadable_quarantine(dataset_uri, tiny, samples):
    d = dataset_uri
    with ShardWriter(d, tiny) as w:
        w.add(samples[0])
        w.record_failure("x", "boom")
    (chunk,) = listed_chunks(d)
    write_object(d, chunk, b'{"torn')
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [(chunk, "quarantine_size")]


def test_validate_warns_about_leftovers_but_passes(dataset_uri, tiny, samples):
    d = write_dir(dataset_uri, tiny, samples[:3])
    leftovers = [shard_name(WRITER, 1)]  # sealed, never published (the writer was killed)
    write_object(d, leftovers[0], b"an unpublished shard")
    if is_local(d):  # a local writer killed mid-write leaves its temp file
        leftovers.append(temp_name(shard_name(WRITER, 2)))
        write_object(d, leftovers[1], b"partial")
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0 and len(doc["warnings"]) == len(leftovers)
    assert sorted(x.split(":")[0] for x in doc["warnings"]) == sorted(leftovers)
    assert "unpublished shard" in " ".join(doc["warnings"])


@pytest.mark.parametrize("name", ["notes.txt", "plot.png"])
def test_validate_warns_about_a_foreign_file_at_the_top_level(dataset_uri, tiny, samples, name):
    """pyarrow.dataset() over the dataset would try to read it as a shard."""
    d = write_dir(dataset_uri, tiny, samples[:3])
    write_object(d, name, b"not a shard")
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0
    assert [x for x in doc["warnings"] if x.startswith(name)], doc["warnings"]
    assert "pyarrow.dataset" in " ".join(doc["warnings"])


def test_inspect_totals_bytes_and_expert_load(tmp_path, tiny, samples):
    d = tmp_path / "d"
    with ShardWriter(d, tiny, samples_per_shard=5) as w:
        for s in samples:
            w.add(s)
        w.record_failure("lost", "timeout")
    png = tmp_path / "load.png"
    code, doc, _ = run_cli("inspect", d, "--plot", png, "--json")
    assert code == 0
    tokens = sum(s.num_tokens for s in samples)
    assert doc["totals"]["samples"] == 12 and doc["totals"]["tokens"] == tokens
    assert doc["totals"]["outcomes"] == {"stored": 12, "rejected": 0, "failed": 1}
    size = sum(local_path(d, n).stat().st_size for n in shard_objects(d))
    assert size > 0
    assert doc["bytes_per_token"] == round(size / tokens, 3)
    assert doc["int32_bytes_per_token"] == 4 * 2 * 4
    # expert load = per-layer bincount of every stored id
    ids = np.concatenate([s.routed for s in samples])
    want = np.stack([np.bincount(ids[:, layer].ravel(), minlength=8) for layer in range(4)])
    assert doc["expert_load"]["counts"] == want.tolist()
    assert doc["expert_load"]["layers"] == [0, 1, 2, 3]
    hot = want.argmax(axis=1)
    assert [row["hottest_expert"] for row in doc["layers"]] == hot.tolist()
    assert doc["layers"][0]["max_over_mean"] == round(want[0].max() / want[0].mean(), 4)
    assert doc["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, out = run_cli("inspect", d)
    assert code == 0 and "B/token" in out and "hottest expert" in out


def test_inspect_load_with_dense_layers_and_uint16(tmp_path):
    from replay_bridge.geometry import RoutingGeometry
    from replay_bridge.inspection import inspect_dir

    from .conftest import make_sample

    g = RoutingGeometry(5, (2, 4), 3, 300)
    samples = [make_sample(g, f"x{i}", 30, seed=i) for i in range(3)]
    d = write_dir(tmp_path / "d", g, samples)
    load = inspect_dir(d).load
    ids = np.concatenate([s.routed for s in samples])
    assert load.shape == (2, 300)
    np.testing.assert_array_equal(load[1], np.bincount(ids[:, 1].ravel(), minlength=300))


def test_bench_shards_json(tmp_path):
    code, doc, out = run_cli("bench", "shards", "--tokens", "6000", "--repeats", "1",
                             "--lookups", "5", "--workdir", tmp_path, "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert doc["geometry"]["top_k"] == 8 and doc["geometry"]["num_experts"] == 128
    assert doc["data"]["tokens"] >= 6000
    assert doc["targets"]["bytes_per_token_max"] == 384
    variants = {r["variant"]: r for r in doc["results"]}
    assert set(variants) == {"zstd", "zstd-3", "zstd-9", "lz4", "none"}
    # uncompressed shards hold at least the uint8 routing: 384 B per routed row
    rows = doc["data"]["routing_bytes"] / 384
    assert variants["none"]["bytes"] > rows * 384
    assert variants["zstd"]["bytes"] < variants["none"]["bytes"]
    for r in doc["results"]:
        assert r["read_routing_gb_s"] > 0 and r["write_mb_s"] > 0
    assert list(tmp_path.iterdir()) == []  # cleaned up
