"""Fuzzed local datasets: bytes of shards, quarantine chunks and the compact index, manifest
fields (types, values, huge numbers, names with ``..``, absolute paths, non-ASCII digits, other
writers' names), objects replaced by symlinks, directories, empty files or FIFOs, and schema
geometry metadata. ``validate`` (the function and the CLI) flags every case with exit 1 or 2,
never hangs, never lets an exception past the CLI, and never writes (names, modes, sizes and
mtimes compared before and after, in the dataset and in a directory a symlink points to). The
reader answers with data or a ShardError. A seeded loop, each case a test id, so a failure
replays alone."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from replay_bridge.checks import CheckReport
from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardError, ShardReader, ShardWriter, validate_dir
from replay_bridge.shards._checksum import object_digest
from tests.support.processes import child_env

from .conftest import make_sample
from .helpers import (DIGEST, WRITER, index_name, manifest_name, object_names, quarantine_name,
                      relist, rewrite_shard, shard_name)

SHARDS = (shard_name(WRITER, 0), shard_name(WRITER, 1))
CHUNK = quarantine_name(WRITER, 0)
MANIFEST = manifest_name(WRITER)
INDEX = index_name(WRITER, 2)
"""The index of the source's last publish (one per shard sealed, one for the chunk)."""
MEMBERS = (*SHARDS, CHUNK, INDEX)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    g = RoutingGeometry.from_preset("tiny-qwen3-moe")
    d = tmp_path_factory.mktemp("fuzz-src") / "d"
    with ShardWriter(d, g, samples_per_shard=3, batch_bytes=200, writer_id=WRITER) as w:
        for i in range(6):
            w.add(make_sample(g, f"s{i}", 16 + i, seed=i))
        w.quarantine(CheckReport("bad", kinds=("all_zero",), message="zeros"))
        w.record_failure("lost", "connection reset")
    assert object_names(d) == sorted([*MEMBERS, MANIFEST])
    assert validate_dir(d).ok
    return d


def snapshot(*roots: Path) -> dict[str, tuple]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = os.lstat(p)
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# ---- mutations: each takes (rng, directory, outside) and says what it did -------------------


def mutate_bytes(rng: random.Random, d: Path, outside: Path) -> str:
    name = rng.choice(MEMBERS)
    p = d / name
    data = bytearray(p.read_bytes())
    op = rng.choice(["flip", "truncate", "append", "zero", "insert"])
    at = rng.randrange(len(data))
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= rng.randint(1, 255)
    elif op == "truncate":
        del data[at:]
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == "zero":
        data[at:at + rng.randint(1, 256)] = bytes(len(data[at:at + rng.randint(1, 256)]))
        data[at] ^= 0xFF  # at least one byte differs
    else:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    p.write_bytes(bytes(data))
    relisted = name == INDEX and rng.random() < 0.5
    if relisted:  # listed as it now is: only what the index says is hostile
        relist(d, name)
    return f"{op} bytes of {name} at {at}{' (relisted)' if relisted else ''}"


S0 = SHARDS[0]
NAMES = ["..", f"../{S0}", "/etc/passwd", str(Path("/tmp") / S0),
         "part-w0-\u0660\u0660\u0660\u0660\u0660\u0660.arrow", f"{S0}/..",
         f"{S0}\x00", f"{S0} ", S0.upper(), f"./{S0}", "part-w0-0000007.arrow", CHUNK,
         SHARDS[1], "part-w0-\uff10\uff10\uff10\uff10\uff10\uff10.arrow", MANIFEST, INDEX,
         "part-w1-000000.arrow", f"_routing_replay/../{S0}", "shard-000000.arrow",
         "manifest.json"]
VALUES: list[Any] = ["x", "", 1.5, True, False, None, [], {}, -1, 0, 1, 7, 2**31, 2**63,
                     -(2**63), 10**13, 10**30, [0, 1], {"a": 1}, "1", "\u0661", 1e308]
FIELDS = [
    ("format",), ("format_version",),
    *[("geometry", k) for k in ("num_layers", "moe_layers", "top_k", "num_experts", "id_dtype")],
    *[("shards", i, k) for i in (0, 1)
      for k in ("file", "rows", "tokens", "routed_rows", "bytes", DIGEST)],
    *[("quarantine", 0, k) for k in ("file", "records", "bytes", DIGEST)],
    *[("index", k) for k in ("file", "rows", "bytes", DIGEST)], ("index",), ("writer",),
    *[("totals", k) for k in ("shards", "samples", "tokens", "routed_rows", "bytes",
                              "quarantined")],
    ("outcomes", "stored"), ("geometry",), ("shards",), ("quarantine",), ("totals",),
    ("outcomes",), ("shards", 0), ("quarantine", 0),
]


def mutate_manifest(rng: random.Random, d: Path, outside: Path) -> str:
    path = d / MANIFEST
    doc = json.loads(path.read_text())
    keys = rng.choice(FIELDS)
    node = doc
    for k in keys[:-1]:
        node = node[k]
    old = node[keys[-1]]
    op = rng.choice(["set", "set", "set", "delete", "duplicate"])
    if op == "delete":
        del node[keys[-1]]
    elif op == "duplicate" and isinstance(old, list) and old:
        old.append(copy.deepcopy(old[0]))
    else:
        op = "set"
        pool = NAMES if keys[-1] == "file" else VALUES
        new = rng.choice([v for v in pool if not (type(v) is type(old) and v == old)])
        node[keys[-1]] = new
    path.write_text(json.dumps(doc))
    return f"{op} manifest {'.'.join(map(str, keys))}"


def replace_member(rng: random.Random, d: Path, outside: Path) -> str:
    name = rng.choice([*MEMBERS, MANIFEST])
    p = d / name
    how = rng.choice(["symlink-outside", "symlink-member", "dangling", "directory", "empty"])
    copy_out = outside / f"copy-of-{Path(name).name}"
    shutil.copyfile(p, copy_out)
    p.unlink()
    if how == "symlink-outside":  # to an identical copy: only the link itself is wrong
        os.symlink(copy_out, p)
    elif how == "symlink-member":
        os.symlink(d / (SHARDS[1] if name != SHARDS[1] else SHARDS[0]), p)
    elif how == "dangling":
        os.symlink(outside / "nothing-here", p)
    elif how == "directory":
        p.mkdir()
        (p / "inside").write_text("x")
    else:
        p.write_bytes(b"")
    return f"{name} replaced by {how}"


META_EDITS: list[tuple[str, Any]] = [
    ("num_layers", 10**13), ("num_layers", "4"), ("top_k", 10**6), ("num_experts", 0),
    ("num_experts", 16), ("moe_layers", "0123"), ("moe_layers", [0, 1, 2, 9]),
    ("moe_layers", [0, 1, 2, 2.5]), ("format_version", 1), ("format_version", 2),
    ("format_version", 3), ("format_version", 5),
    ("id_dtype", "uint16"),
    ("num_layers", None), ("name", ["x"]),
]


def mutate_schema(rng: random.Random, d: Path, outside: Path) -> str:
    """Rewrite a shard with other schema metadata (or column type), re-listed in its manifest
    and index: a dataset consistent in every respect but the shard's schema."""
    name = rng.choice(SHARDS)
    what = [""]
    rewrite_shard(d, name, lambda table: _edit_schema(rng, table, what))
    return f"schema of {name}: {what[0]}"


def _edit_schema(rng: random.Random, table: pa.Table, said: list[str]) -> pa.Table:
    meta = dict(table.schema.metadata)
    doc = orjson.loads(meta[b"routing_replay"])
    what = rng.choice(["edit", "edit", "edit", "delete-key", "not-json", "no-metadata",
                       "column-type"])
    if what == "edit":
        key, value = rng.choice(META_EDITS)
        doc[key] = value
        what = f"{key}={value!r:.20}"
    elif what == "delete-key":
        key = rng.choice(["num_layers", "moe_layers", "top_k", "num_experts", "format_version"])
        del doc[key]
        what = f"no {key}"
    if what == "not-json":
        meta[b"routing_replay"] = b"{not json"
    elif what == "no-metadata":
        meta = {}
    elif what == "column-type":
        i = table.schema.get_field_index("tokens")
        table = table.set_column(i, pa.field("tokens", pa.list_(pa.int64())),
                                 table.column(i).cast(pa.list_(pa.int64())))
    else:
        meta[b"routing_replay"] = orjson.dumps(doc)
    said[0] = what
    return table.replace_schema_metadata(meta)


MUTATIONS = [mutate_bytes] * 3 + [mutate_manifest] * 5 + [replace_member] * 2 + [mutate_schema] * 2
CASES = 160


def _copy(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "d"
    shutil.copytree(source, d)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bystander").write_text("must not change")
    return d, outside


@pytest.mark.parametrize("seed", range(CASES))
def test_validate_flags_a_fuzzed_directory_and_writes_nothing(source, tmp_path, seed):
    rng = random.Random(seed)
    d, outside = _copy(source, tmp_path)
    _flagged_and_untouched(d, outside, rng.choice(MUTATIONS)(rng, d, outside))


def _set(keys: tuple, value: Any):
    def edit(rng: random.Random, d: Path, outside: Path) -> str:
        doc = json.loads((d / MANIFEST).read_text())
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        (d / MANIFEST).write_text(json.dumps(doc))
        return f"manifest {'.'.join(map(str, keys))} = {value!r:.30}"
    return edit


FIXED = {
    "num_layers 10**13": _set(("geometry", "num_layers"), 10**13),
    "num_experts 2**16+1": _set(("geometry", "num_experts"), 2**16 + 1),
    "top_k 2**10+1": _set(("geometry", "top_k"), 2**10 + 1),
    "moe layer -1": _set(("geometry", "moe_layers"), [-1, 0, 1, 2]),
    "rows 10**30": _set(("shards", 0, "rows"), 10**30),
    "bytes 2**63": _set(("shards", 1, "bytes"), 2**63),
    **{f"file {name!r}": _set(("shards", 0, "file"), name) for name in NAMES},
    **{f"chunk {name!r}": _set(("quarantine", 0, "file"), name) for name in NAMES[:6]},
    **{f"index {name!r}": _set(("index", "file"), name)
       for name in [*NAMES[:6], SHARDS[1], MANIFEST, index_name(WRITER, 1), index_name("w1", 2)]},
    "index rows 10**30": _set(("index", "rows"), 10**30),
    "index bytes 2**63": _set(("index", "bytes"), 2**63),
    "writer of another": _set(("writer",), "w1"),
}


@pytest.mark.parametrize("case", list(FIXED))
def test_validate_flags_named_manifest_cases(source, tmp_path, case):
    d, outside = _copy(source, tmp_path)
    _flagged_and_untouched(d, outside, FIXED[case](random.Random(0), d, outside))


def _flagged_and_untouched(d: Path, outside: Path, what: str) -> None:
    before = snapshot(d, outside)

    try:
        report = validate_dir(d)
    except ShardError as e:
        assert str(e), what
        expected = 2
    else:
        assert not report.ok, f"{what}: validate found nothing"
        expected = 1
    result = CliRunner().invoke(command_line(), ["validate", str(d), "--json"])
    assert isinstance(result.exception, SystemExit), (what, repr(result.exception))
    assert result.exit_code == expected, (what, result.output)
    assert "Traceback" not in result.output
    doc = orjson.loads(result.stdout)
    assert doc["exit_code"] == expected
    result = CliRunner().invoke(command_line(), ["validate", str(d)])
    assert result.exit_code == expected and "Traceback" not in result.output, (what,
                                                                                result.output)

    try:  # the reader: data or a ShardError, whatever the damage
        r = ShardReader(d, verify=False)
        for _ in r:
            pass
        list(r.quarantined())
    except ShardError:
        pass
    assert snapshot(d, outside) == before, f"{what}: something was written"


FIFO_CHILD = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from replay_bridge.cli import command_line
    from replay_bridge.shards import ShardError, validate_dir

    out = {}
    for d in sys.argv[1:]:
        try:
            rep = validate_dir(d)
            code = 0 if rep.ok else 1
        except ShardError:
            code = 2
        res = CliRunner().invoke(command_line(), ["validate", d, "--json"])
        out[d] = {"function": code, "cli": res.exit_code, "traceback": "Traceback" in res.output,
                  "exception": repr(res.exception)}
    print(json.dumps(out))
""")


def test_fifos_in_place_of_members_are_flagged_without_hanging(source, tmp_path):
    """One child process for every FIFO case, with a timeout: a blocked open never returns."""
    dirs = []
    for i, name in enumerate([*MEMBERS, MANIFEST]):
        for empty in (False, True):
            if name == MANIFEST and empty:
                continue
            d, outside = _copy(source, tmp_path / f"{i}-{empty}")
            (d / name).unlink()
            os.mkfifo(d / name)
            if empty:  # the manifest says it is empty: only opening it could tell
                doc = json.loads((d / MANIFEST).read_text())
                for e in doc["shards"] + doc["quarantine"] + [doc["index"]]:
                    if e["file"] == name:
                        doc["totals"]["bytes"] -= e["bytes"] if name in SHARDS else 0
                        e.update({"bytes": 0, DIGEST: object_digest(b"", DIGEST)})
                (d / MANIFEST).write_text(json.dumps(doc))
            dirs.append(d)
    before = snapshot(*(d.parent for d in dirs))
    proc = subprocess.run([sys.executable, "-c", FIFO_CHILD, *map(str, dirs)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for d in dirs:
        res = results[str(d)]
        assert res["function"] in (1, 2) and res["cli"] == res["function"], (d, res)
        assert not res["traceback"] and res["exception"].startswith("SystemExit"), (d, res)
    assert snapshot(*(d.parent for d in dirs)) == before
