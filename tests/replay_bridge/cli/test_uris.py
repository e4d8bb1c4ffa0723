"""Datasets as URIs on the command line: every command takes a local path, ``file://`` or
``s3://`` (a loopback S3 server here); an unsupported ``scheme://`` is a usage error, never a
local folder named after the scheme; credentials in a URI are never printed; ``cleanup``
removes what crashed writers left; no plot is ever written into a dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader
from tests.replay_bridge.protocols.engines import routing, sglang_generate
from tests.support.processes import ROOT, child_env

TINY = RoutingGeometry.from_preset("tiny-qwen3-moe")
pytestmark = pytest.mark.timeout(300)


def run(*args: object) -> tuple[int, object, str]:
    """``(exit code, JSON document or None, all output)``; a traceback fails the test."""
    argv = [str(a) for a in args]
    result = CliRunner().invoke(command_line(), argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{argv} crashed: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    doc = orjson.loads(result.stdout) if "--json" in argv and result.stdout.strip() else None
    return result.exit_code, doc, result.output


def traffic(path: Path, ids: list[str], seed: int = 0) -> dict[str, tuple[list[int], np.ndarray]]:
    """Write SGLang traffic for ``ids``; return each id's tokens and stored routing."""
    rng = np.random.default_rng(seed)
    expected, lines = {}, []
    for sid in ids:
        prompt = rng.integers(0, 900, int(rng.integers(2, 9))).tolist()
        out = rng.integers(0, 900, int(rng.integers(1, 6))).tolist()
        r = routing(rng, len(prompt) + len(out) - 1, TINY)
        req, body = sglang_generate(prompt, out, r)
        lines.append(orjson.dumps({"sample_id": sid, "request": req,
                                   "response": orjson.loads(body), "group_id": "g"}))
        expected[sid] = (prompt + out, r[:, list(TINY.moe_layers), :])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


@pytest.fixture
def dump(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "traffic.jsonl"
    return path, traffic(path, [f"s{i:02d}" for i in range(10)])


def ingest(dump_path: Path, out: str, *extra: str) -> tuple[int, object, str]:
    return run("ingest", dump_path, "--model", "tiny-qwen3-moe", "--engine", "sglang",
               "--out", out, "--samples-per-shard", "4", *extra)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- URIs refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", [
    ("http://example.invalid/data", "unsupported dataset URI scheme http://"),
    ("ftp://host/x", "unsupported dataset URI scheme ftp://"),
    ("s4://bucket/prefix", "unsupported dataset URI scheme s4://"),
    ("s3:/bucket/prefix", "not a URI (s3:/ has one slash)"),
    ("gcs:/bucket/prefix", "not a URI (gcs:/ has one slash)"),
    ("http:/example.invalid/data", "not a URI (http:/ has one slash)"),
    ("file://otherhost/x", "a file:// URI names a path of this machine"),
])
def test_unsupported_uris_are_usage_errors_never_local_folders(tmp_path, monkeypatch, dump,
                                                               uri, words):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    commands = [("ingest", dump[0], "--model", "tiny-qwen3-moe", "--engine", "sglang",
                 "--out", uri), ("ingest", dump[0], "--model", "tiny-qwen3-moe", "--engine",
                                 "sglang", "--out", uri, "--append"),
                ("validate", uri), ("inspect", uri), ("cleanup", uri),
                ("cleanup", uri, "--dry-run")]
    for command in commands:
        for as_json in (False, True):
            code, doc, out = run(*command, *(["--json"] if as_json else []))
            assert code == 2, (command, out)
            if as_json:
                assert doc["exit_code"] == 2 and words in doc["error"], doc
            else:
                assert words in " ".join(out.split()), out
    assert tree(tmp_path) == before  # no folder named "s3:", "http:", ...
    assert not Path("s3:").exists() and not Path("http:").exists()


def test_empty_dataset_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, doc, _ = run("validate", "", "--json")
    assert code == 2 and "DATASET is empty" in doc["error"]


# ---- local paths and file:// ----------------------------------------------------------------


def test_a_local_folder_named_like_a_scheme_is_written_only_when_asked_for(tmp_path,
                                                                            monkeypatch, dump):
    monkeypatch.chdir(tmp_path)
    assert ingest(dump[0], "s3:/x")[0] == 2 and not Path("s3:").exists()
    assert ingest(dump[0], "./s3:/x")[0] == 0
    assert len(ShardReader("./s3:/x")) == 10


def test_file_uri_is_the_local_directory(tmp_path, dump):
    path, expected = dump
    d = tmp_path / "ds"
    code, doc, _ = ingest(path, f"file://{d}", "--json")
    assert code == 0 and doc["totals"]["stored"] == 10
    assert doc["out"] == f"file://{d}"
    assert sorted(ShardReader(str(d)).sample_ids()) == sorted(expected)
    code, doc, _ = run("validate", f"file://{d}", "--json")
    assert code == 0 and doc["ok"] and doc["samples"] == 10
    code, doc, _ = run("inspect", d, "--json")
    assert code == 0 and doc["totals"]["samples"] == 10


# ---- every command on S3 --------------------------------------------------------------------


def test_every_command_on_s3(s3, tmp_path, monkeypatch, dump):
    monkeypatch.chdir(tmp_path)
    path, expected = dump
    uri = s3.fresh_uri(label="cli")
    code, doc, out = ingest(path, uri, "--json")
    assert code == 0, out
    assert doc["out"] == uri and doc["totals"]["stored"] == 10
    keys = s3.keys(uri)
    shards = [k for k in keys if "/" not in k]
    assert shards and all(k.startswith("part-") and k.endswith(".arrow") for k in shards)
    assert any(k.startswith("_routing_replay/manifests/") for k in keys)
    assert not any(k.endswith(".tmp") for k in keys)
    reader = ShardReader(uri)
    assert sorted(reader.sample_ids()) == sorted(expected)
    for sid, (tokens, r) in expected.items():
        assert reader[sid].tokens.tolist() == tokens
        np.testing.assert_array_equal(reader.routing(sid), r)

    code, doc, _ = run("validate", uri, "--json")
    assert code == 0 and doc["ok"] and doc["samples"] == 10 and doc["faults"] == []
    code, _, out = run("validate", uri)
    assert code == 0 and "clean" in out and uri in out

    png = tmp_path / "load.png"
    code, doc, _ = run("inspect", uri, "--plot", png, "--json")
    assert code == 0 and doc["totals"]["samples"] == 10 and doc["dataset"] == uri
    assert png.read_bytes()[:4] == b"\x89PNG"
    ids = np.concatenate([r for _, r in expected.values()])
    want = np.stack([np.bincount(ids[:, m].ravel(), minlength=TINY.num_experts)
                     for m in range(TINY.num_moe_layers)])
    assert doc["expert_load"]["counts"] == want.tolist()

    # pyarrow reads the shards at the dataset's top level directly.
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, access_key="testing",
                           secret_key="testing-secret", region="us-east-1")
    table = pads.dataset(uri.removeprefix("s3://"), filesystem=fs, format="arrow").to_table()
    assert sorted(table.column("sample_id").to_pylist()) == sorted(expected)

    code, doc, _ = run("cleanup", uri, "--json")
    assert code == 0 and doc["removed"] == []
    assert s3.keys(uri) == keys
    assert not Path("s3:").exists() and tree(tmp_path) == ["load.png", "traffic.jsonl"]


def test_appending_on_s3(s3, tmp_path, dump):
    path, expected = dump
    uri = s3.fresh_uri(label="append")
    assert ingest(path, uri, "--append")[0] == 0  # the first writer creates the dataset
    keys = s3.keys(uri)

    code, doc, _ = ingest(path, uri, "--json")
    assert code == 2 and "pass --append" in doc["error"]
    code, doc, _ = run("ingest", path, "--model", "qwen3-30b-a3b", "--engine", "sglang",
                       "--out", uri, "--append", "--json")
    assert code == 2 and "num_layers: 4 vs 48" in doc["error"]
    assert s3.keys(uri) == keys  # refused before writing anything

    more = tmp_path / "more.jsonl"
    first = dict(expected)
    expected.update(traffic(more, [f"s{i:02d}" for i in range(5, 15)], seed=1))
    expected.update({f"s{i:02d}": first[f"s{i:02d}"] for i in range(5, 10)})  # first copy kept
    code, doc, _ = ingest(more, uri, "--append", "--json")
    assert code == 0, doc  # the 5 ids stored by the first run are not faults of this one
    assert doc["totals"]["stored"] == 5 and doc["totals"]["rejected"] == 5
    assert {s["outcome"] for s in doc["samples"] if not s["stored"]} == {"duplicate"}
    reader = ShardReader(uri)
    assert sorted(reader.sample_ids()) == sorted(expected) and len(reader) == 15
    for sid, (tokens, r) in expected.items():
        np.testing.assert_array_equal(reader.routing(sid), r)
    code, doc, _ = run("validate", uri, "--json")
    assert code == 0 and doc["samples"] == 15


def test_credentials_in_a_uri_are_never_printed(s3, tmp_path, dump):
    path, _ = dump
    host = s3.endpoint.removeprefix("http://")
    secret = "SeKrIt-do-not-print"
    base = s3.fresh_uri(label="creds").removeprefix("s3://")
    uri = f"s3://testing:{secret}@{base}?endpoint_override={host}&scheme=http"
    absent = f"s3://testing:{secret}@{base}-absent?endpoint_override={host}&scheme=http"
    shown = f"s3://{base}"
    runs = [ingest(path, uri), ingest(path, uri, "--json"),
            ingest(path, uri, "--json"),  # refused: a dataset is there
            run("validate", uri), run("validate", uri, "--json"),
            run("inspect", uri), run("inspect", uri, "--json"),
            run("cleanup", uri, "--dry-run"), run("cleanup", uri, "--json"),
            run("validate", absent), run("validate", absent, "--json")]
    codes = [code for code, _, _ in runs]
    assert codes == [0, 2, 2, 0, 0, 0, 0, 0, 0, 2, 2], [r[2] for r in runs]
    for _, _, out in runs:
        assert secret not in out and "endpoint_override" not in out, out
    assert shown in " ".join(runs[3][2].split())
    assert runs[6][1]["dataset"] == shown


# ---- cleanup --------------------------------------------------------------------------------


def test_cleanup_removes_only_what_no_manifest_lists(request, dataset_uri, tmp_path, dump):
    path, expected = dump
    assert ingest(path, dataset_uri)[0] == 0
    backend = request.node.callspec.params["dataset_uri"]
    s3 = request.getfixturevalue("s3") if backend == "s3" else None

    def names() -> list[str]:
        if s3 is not None:
            return s3.keys(dataset_uri)
        return tree(Path(dataset_uri))

    published = names()
    shard = next(n for n in published if n.startswith("part-"))
    leftovers = ["part-crashedwriter-000000.arrow", "part-crashedwriter-000001.arrow",
                 "_routing_replay/index/crashedwriter-000000.arrow"]
    data = (s3.get(f"{dataset_uri}/{shard}") if s3 is not None
            else (Path(dataset_uri) / shard).read_bytes())
    for name in leftovers:  # what a writer killed before publishing leaves
        if s3 is not None:
            s3.put(f"{dataset_uri}/{name}", data)
        else:
            (Path(dataset_uri) / name).write_bytes(data)

    code, doc, _ = run("validate", dataset_uri, "--json")  # reported, not faults
    assert code == 0 and doc["ok"] and doc["samples"] == 10
    assert all(any(name in w for w in doc["warnings"]) for name in leftovers), doc["warnings"]

    code, doc, _ = run("cleanup", dataset_uri, "--json")  # default: older than an hour
    assert code == 0 and doc["removed"] == [] and set(leftovers) <= set(doc["kept"])
    assert doc["dry_run"] is False and doc["older_than"] == 3600.0
    code, doc, _ = run("cleanup", dataset_uri, "--older-than", "0", "--dry-run", "--json")
    assert code == 0 and sorted(doc["removed"]) == sorted(leftovers) and doc["dry_run"]
    assert sorted(names()) == sorted(published + leftovers)  # a dry run removes nothing

    code, _, out = run("cleanup", dataset_uri, "--older-than", "0")
    assert code == 0 and "removed 3 unlisted object" in " ".join(out.split())
    assert all(name in out for name in leftovers)
    assert names() == published
    code, doc, _ = run("validate", dataset_uri, "--json")
    assert code == 0 and doc["ok"] and doc["warnings"] == [] and doc["samples"] == 10
    assert sorted(ShardReader(dataset_uri).sample_ids()) == sorted(expected)
    code, doc, _ = run("cleanup", dataset_uri, "--older-than", "-1", "--json")
    assert code == 2


def test_cleanup_of_no_dataset_is_a_usage_error(tmp_path):
    code, doc, _ = run("cleanup", tmp_path / "absent", "--json")
    assert code == 2 and "absent" in doc["error"]
    assert not (tmp_path / "absent").exists()


# ---- plots are never written into a dataset -------------------------------------------------


def test_inspect_refuses_a_plot_inside_the_dataset(tmp_path, dump):
    d = tmp_path / "ds"
    assert ingest(dump[0], str(d))[0] == 0
    before = tree(d)
    for plot in (d / "expert-load.png", d / "_routing_replay" / "x.png", d):
        code, doc, _ = run("inspect", d, "--plot", plot, "--json")
        assert code == 2 and "is inside the dataset" in doc["error"], doc
    assert tree(d) == before
    code, doc, _ = run("inspect", d, "--plot", tmp_path / "ds-expert-load.png", "--json")
    assert code == 0 and (tmp_path / "ds-expert-load.png").exists()
    assert pads.dataset(str(d), format="arrow").count_rows() == 10


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "replay-bridge").exists(),
                    reason="the demo script runs .venv/bin/replay-bridge (scripts/setup.sh)")
def test_demo_offline_writes_its_plot_next_to_the_dataset(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo_offline.sh"), str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "demo-expert-load.png").read_bytes()[:4] == b"\x89PNG"
    top = sorted(os.listdir(out))
    assert all(n.startswith("part-") and n.endswith(".arrow") for n in top if n[0] != "_"), top
    assert not any(n.endswith(".png") for n in top)
    assert pads.dataset(str(out), format="arrow").count_rows() == 18
    assert "18 rows" in proc.stdout
    shutil.rmtree(out)
