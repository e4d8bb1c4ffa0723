"""A FIFO, a directory or a device node named like a listed shard, quarantine chunk, index or
manifest of a local dataset: the reader (every verify mode), ``validate`` and a resuming writer
refuse it as ``unreadable``, naming the file, and never block on it. Each case runs in a child
process with a timeout, since the failure this guards against is a hang. (Local only: an object
store has no special files.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardWriter
from replay_bridge.shards._checksum import object_digest
from tests.support.processes import child_env, cli

from .conftest import make_sample
from .helpers import (DIGEST, WRITER, edit_manifest, index_name, index_of, local_path,
                      manifest_name, object_names, quarantine_name, read_object, shard_name)

S0, S1 = shard_name(WRITER, 0), shard_name(WRITER, 1)
CHUNK = quarantine_name(WRITER, 0)

TIMEOUT = 90  # seconds for a whole child process; a blocked open() never returns

CHILD = textwrap.dedent("""
    import json, sys
    from replay_bridge.shards import ShardError, ShardReader, validate_dir

    def attempt(fn):
        try:
            fn()
            return {"ok": True}
        except ShardError as e:
            return {"error": str(e), "kind": e.kind, "file": e.file}
        except Exception as e:  # what the test must never see
            return {"crash": f"{type(e).__name__}: {e}"}

    def read_all(d, verify):
        r = ShardReader(d, verify=verify)
        for _ in r:
            pass
        for sid in r.sample_ids():
            r.routing(sid)
        list(r.quarantined())

    out = {}
    for d in sys.argv[1:]:
        res = {str(v): attempt(lambda: read_all(d, v)) for v in (True, "read", False)}
        try:
            rep = validate_dir(d)
            res["validate"] = {"ok": rep.ok, "faults": [f.to_dict() for f in rep.faults]}
        except ShardError as e:
            res["validate"] = {"error": str(e), "kind": e.kind, "file": e.file}
        out[d] = res
    print(json.dumps(out))
""")


def _run_child(*dirs) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, dirs)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=child_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _make_dir(path, tiny):
    with ShardWriter(path, tiny, samples_per_shard=3, writer_id=WRITER) as w:
        for i in range(6):
            w.add(make_sample(tiny, f"s{i}", 12, seed=i))
        w.quarantine(CheckReport("bad", kinds=("all_zero",), message="zeros"))
    return path


def _replace(path, what: str) -> None:
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    elif what == "dir":
        path.mkdir()
    else:
        raise AssertionError(what)


def _list_as_empty(d, name) -> None:
    """Make the manifest say ``name`` is an empty file: the size check passes, so only opening
    it can tell."""
    empty = object_digest(b"", DIGEST)

    def fn(doc):
        for e in doc["shards"]:
            if e["file"] == name:
                doc["totals"]["bytes"] -= e["bytes"]
                e.update({"bytes": 0, DIGEST: empty})
        for e in doc["quarantine"] + [doc["index"]]:
            if e["file"] == name:
                e.update({"bytes": 0, DIGEST: empty})
    edit_manifest(d, fn)


@pytest.mark.parametrize("what", ["fifo", "dir"])
def test_special_file_named_like_a_member_is_unreadable_never_a_hang(tmp_path, tiny, what):
    cases = {}
    for member in ("shard", "chunk", "index", "manifest"):
        for empty in (False, True):
            if member == "manifest" and empty:
                continue
            d = _make_dir(tmp_path / f"{member}-{empty}", tiny)
            name = {"shard": S1, "chunk": CHUNK, "index": index_of(d),
                    "manifest": manifest_name(WRITER)}[member]
            if empty:
                _list_as_empty(d, name)
            _replace(local_path(d, name), what)
            cases[str(d)] = (member, name)
    results = _run_child(*cases)
    for d, (member, name) in cases.items():
        res = results[d]
        if member == "manifest" and what == "dir":  # a folder is no object: nothing published
            for r in res.values():
                assert r["kind"] == "manifest" and "no published manifest" in r["error"], r
            continue
        for mode in ("True", "read", "False"):
            r = res[mode]
            assert "crash" not in r, (d, mode, r)
            assert "ok" not in r, (d, mode, "read a special file as data")
            assert r["file"] == name, (d, mode, r)
            if r["kind"] not in ("size", "counts", "checksum"):  # a size may be found first
                assert r["kind"] == "unreadable" and "not a regular file" in r["error"], r
        if member in ("index", "manifest"):  # the dataset cannot be opened: exit 2, by name
            assert res["validate"]["file"] == name, res["validate"]
            assert "not a regular file" in res["validate"]["error"]
            continue
        faults = res["validate"]["faults"]
        assert not res["validate"]["ok"]
        assert {f["file"] for f in faults} == {name}, faults
        assert any("not a regular file" in f["message"] for f in faults), faults


def test_validate_cli_on_a_fifo_shard_exits_1_naming_it(tmp_path, tiny):
    d = _make_dir(tmp_path / "d", tiny)
    _replace(d / S0, "fifo")
    _list_as_empty(d, S0)
    proc = subprocess.run(cli("validate", str(d), "--json"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=child_env())
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert [(f["file"], f["kind"]) for f in doc["faults"]][:1] == [(S0, "unreadable")]
    assert "not a regular file" in doc["faults"][0]["message"]
    assert "Traceback" not in proc.stderr


RESUME = textwrap.dedent("""
    import sys
    from replay_bridge.geometry import RoutingGeometry
    from replay_bridge.shards import ShardError, ShardWriter
    try:
        w = ShardWriter(sys.argv[1], RoutingGeometry.from_preset("tiny-qwen3-moe"), resume=True)
        print("resumed", len(w.stored_ids))
        w.close()
    except ShardError as e:
        print("refused:", e)
""")


@pytest.mark.parametrize("name", [shard_name(WRITER, 7), quarantine_name(WRITER, 7),
                                  index_name(WRITER, 7), shard_name("w9", 0),
                                  manifest_name("w9")])
def test_resuming_writer_never_reads_an_unlisted_fifo(tmp_path, tiny, name):
    """A new writer reads published manifests and their indexes only: a FIFO under an
    unlisted object's name is never opened; one under a manifest's name is refused by name.
    cleanup removes an unlisted one without opening it."""
    from replay_bridge.shards import cleanup_dataset

    d = _make_dir(tmp_path / "d", tiny)
    os.mkfifo(d / name)
    proc = subprocess.run([sys.executable, "-c", RESUME, str(d)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=child_env())
    assert proc.returncode == 0, proc.stderr
    if name == manifest_name("w9"):
        assert proc.stdout.startswith(f"refused: {name}: not a regular file"), proc.stdout
        return
    assert proc.stdout.startswith("resumed 6"), proc.stdout
    for m in (n for n in object_names(d) if n.startswith("_routing_replay/manifests/")):
        assert name not in read_object(d, m).decode()
    assert name in cleanup_dataset(d, older_than=0).removed
    assert not os.path.lexists(d / name)
