"""Helpers for the shard tests: write a dataset, run the CLI, and find, read, overwrite and
edit a dataset's objects (shards, per-writer manifests, compact indexes, quarantine chunks) on
a local directory or an S3-compatible server alike. Every name of the storage format the tests
need is spelled here, not in the tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import FORMAT_VERSION, Manifest, ShardWriter
from replay_bridge.shards._checksum import checksums_for, object_digest
from replay_bridge.shards._index import index_schema
from replay_bridge.shards._manifest import (FOLDER, INDEX_DIR, INDEX_RE, MANIFEST_DIR,
                                            MANIFEST_RE, QUARANTINE_DIR, QUARANTINE_RE,
                                            SHARD_RE, index_name, manifest_name,
                                            quarantine_name, shard_name)
from replay_bridge.shards._store import Store, open_store

__all__ = [
    "BLOCK_CHECKSUM", "DIGEST", "FOLDER", "INDEX_DIR", "MANIFEST_DIR", "QUARANTINE_DIR",
    "SHARD_RE", "WRITER", "delete_object", "edit_index", "edit_manifest", "index_of", "index_name",
    "is_local", "listed_chunks", "listed_shards", "local_path", "manifest_doc", "manifest_name",
    "manifest_of", "manifests", "object_names", "quarantine_name", "read_object", "relist",
    "rewrite_shard", "run_cli", "set_format_version", "shard_name", "shard_objects", "temp_name",
    "with_format_label", "write_dir", "write_object", "writer_ids",
]

WRITER = "w0"
"""The writer id of :func:`write_dir` unless told otherwise: predictable object names."""
DIGEST = checksums_for(FORMAT_VERSION).object_algorithm
"""A manifest entry's key for its object's digest, in the format written today."""
BLOCK_CHECKSUM = checksums_for(FORMAT_VERSION).block_algorithm
"""The index column of a record batch's checksum, in the format written today."""


# ---- writing and running ---------------------------------------------------------------------


def write_dir(uri: Any, geometry, samples: list[RoutedSample], **options: Any) -> Any:  # noqa: ANN001
    """Write ``samples`` into a new dataset (writer :data:`WRITER` unless ``writer_id`` is
    given); return ``uri``."""
    options.setdefault("writer_id", WRITER if not options.get("resume") else None)
    with ShardWriter(uri, geometry, **options) as w:
        for s in samples:
            w.add(s)
    return uri


def run_cli(*args: Any) -> tuple[int, Any, str]:
    """``(exit code, parsed JSON or None, output)``; fails on any exception but SystemExit."""
    result = CliRunner().invoke(command_line(), [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"crashed: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    try:
        doc = orjson.loads(result.stdout) if "--json" in args else None
    except orjson.JSONDecodeError:
        doc = None
    return result.exit_code, doc, result.output


# ---- where things are ------------------------------------------------------------------------


def store(uri: Any) -> Store:
    return open_store(uri)


def is_local(uri: Any) -> bool:
    return open_store(uri).local is not None


def local_path(uri: Any, name: str = "") -> Path:
    """The local path of object ``name`` (the dataset's folder for ``""``)."""
    local = open_store(uri).local
    assert local is not None, f"{uri} is not a local dataset"
    return local / name if name else local


def temp_name(name: str) -> str:
    """The local temp file a writer writes object ``name`` through."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/.{base}.tmp" if folder else f".{base}.tmp"


def object_names(uri: Any) -> list[str]:
    """Every file under the dataset (recursive, relative, sorted); directory markers of object
    stores left out. Locally, links and special files are listed too (not followed)."""
    st = open_store(uri)
    if st.local is not None:
        if not st.local.is_dir():
            return []
        return sorted(str(p.relative_to(st.local)) for p in st.local.rglob("*")
                      if p.is_symlink() or not p.is_dir())
    infos = st.fs.get_file_info(pafs.FileSelector(st.root, recursive=True, allow_not_found=True))
    prefix = st.root + "/"
    return sorted(i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File
                  and not i.path.endswith("/"))


def manifests(uri: Any) -> list[str]:
    """The names of the published per-writer manifests, sorted."""
    return [n for n in object_names(uri) if MANIFEST_RE.fullmatch(n)]


def writer_ids(uri: Any) -> list[str]:
    return [MANIFEST_RE.fullmatch(n).group("writer") for n in manifests(uri)]


def manifest_of(uri: Any, writer: str | None = None) -> str:
    """The manifest of ``writer`` (default: the dataset's only writer)."""
    if writer is not None:
        return manifest_name(writer)
    names = manifests(uri)
    assert len(names) == 1, f"expected one writer, found {names}"
    return names[0]


def manifest_doc(uri: Any, writer: str | None = None) -> dict[str, Any]:
    return json.loads(read_object(uri, manifest_of(uri, writer)))


def index_of(uri: Any, writer: str | None = None) -> str:
    """The index object that ``writer``'s manifest names."""
    return manifest_doc(uri, writer)["index"]["file"]


def listed_shards(uri: Any) -> list[str]:
    """The shards the dataset's manifests list, in storage order."""
    return [s.file for s in Manifest.read(uri).shards]


def listed_chunks(uri: Any) -> list[str]:
    """The quarantine chunks the manifests list, in reading order."""
    return [q.file for q in Manifest.read(uri).quarantine]


def shard_objects(uri: Any) -> list[str]:
    """Every shard-named object at the top level, listed or not."""
    return [n for n in object_names(uri) if SHARD_RE.fullmatch(n)]


def chunk_objects(uri: Any) -> list[str]:
    return [n for n in object_names(uri) if QUARANTINE_RE.fullmatch(n)]


def index_objects(uri: Any) -> list[str]:
    return [n for n in object_names(uri) if INDEX_RE.fullmatch(n)]


# ---- raw object access (as a foreign process, a crash or an attacker would) -------------------


def read_object(uri: Any, name: str) -> bytes:
    st = open_store(uri)
    if st.local is not None:
        return (st.local / name).read_bytes()
    with st.fs.open_input_stream(st.path(name)) as f:
        return f.read()


def write_object(uri: Any, name: str, data: bytes) -> None:
    """Overwrite (or create) object ``name`` in place: locally a plain write of the path, on
    an object store a PUT under that key."""
    st = open_store(uri)
    if st.local is not None:
        p = st.local / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return
    with st.fs.open_output_stream(st.path(name)) as f:
        f.write(data)


def delete_object(uri: Any, name: str) -> None:
    st = open_store(uri)
    if st.local is not None:
        (st.local / name).unlink()
    else:
        st.fs.delete_file(st.path(name))


def flip_bytes(uri: Any, name: str, start: float = 1 / 3, count: int = 64) -> None:
    """Corrupt ``count`` bytes of an object from ``start`` (a fraction of its size) on."""
    data = bytearray(read_object(uri, name))
    at = int(len(data) * start)
    for i in range(at, min(at + count, len(data))):
        data[i] ^= 0xA5
    write_object(uri, name, bytes(data))


# ---- consistent edits ----------------------------------------------------------------------


def edit_manifest(uri: Any, fn: Callable[[dict[str, Any]], Any],
                  writer: str | None = None) -> None:
    """Apply ``fn`` to a writer's manifest document (the only writer's by default) and write it
    back in place."""
    name = manifest_of(uri, writer)
    doc = json.loads(read_object(uri, name))
    fn(doc)
    write_object(uri, name, json.dumps(doc).encode())


def relist(uri: Any, name: str, writer: str | None = None) -> None:
    """List object ``name`` in its writer's manifest with its current size and digest
    (totals kept in step): only what the object holds is wrong, not its listing."""
    data = read_object(uri, name)

    def fn(doc: dict[str, Any]) -> None:
        key = checksums_for(doc["format_version"]).object_algorithm
        digest = object_digest(data, key)
        for e in doc["shards"]:
            if e["file"] == name:
                doc["totals"]["bytes"] += len(data) - e["bytes"]
                e.update({"bytes": len(data), key: digest})
        for e in doc["quarantine"] + ([doc["index"]] if doc.get("index") else []):
            if e["file"] == name:
                e.update({"bytes": len(data), key: digest})
    edit_manifest(uri, fn, writer)


def set_format_version(uri: Any, version: int, writer: str | None = None,
                       shards: bool = True) -> None:
    """Make a writer's dataset objects format ``version`` as far as checksums and labels go:
    its shards' schema metadata says ``version`` (``shards=False``: left saying what they
    say), its manifest says ``version``, every entry's digest and the index's record-batch
    checksums are recomputed under that format's algorithms. Columns are not changed."""
    from replay_bridge.shards._index import index_bytes

    if shards:
        for name in [e["file"] for e in manifest_doc(uri, writer)["shards"]]:
            rewrite_shard(uri, name, lambda t: with_format_label(t, version), writer)
    doc = manifest_doc(uri, writer)
    index = read_index(uri, writer)
    new = checksums_for(version)
    datas = [read_object(uri, e["file"]) for e in doc["shards"]]
    sums = [new.block(datas[s][o:o + n]) if s >= 0 else 0
            for s, o, n in zip(*(index.column(c).to_pylist()
                                 for c in ("shard", "offset", "length")))]
    at = index.schema.get_field_index(checksums_for(doc["format_version"]).block_algorithm)
    index = index.set_column(at, pa.field(new.block_algorithm, new.block_type, nullable=False),
                             pa.array(sums, new.block_type))
    write_object(uri, doc["index"]["file"], index_bytes(index))
    old_key = checksums_for(doc["format_version"]).object_algorithm

    def fn(d: dict[str, Any]) -> None:
        d["format_version"] = version
        for e in d["shards"] + d["quarantine"] + [d["index"]]:
            e.pop(old_key)
            e["bytes"] = len(data := read_object(uri, e["file"]))
            e[new.object_algorithm] = object_digest(data, new.object_algorithm)
    edit_manifest(uri, fn, writer)


def with_format_label(data: pa.Table | pa.RecordBatch, version: int
                      ) -> pa.Table | pa.RecordBatch:
    """``data`` whose schema metadata says ``format_version`` ``version`` (nothing else
    changed)."""
    meta = dict(data.schema.metadata)
    doc = orjson.loads(meta[b"routing_replay"])
    doc["format_version"] = version
    meta[b"routing_replay"] = orjson.dumps(doc)
    return data.replace_schema_metadata(meta)


def read_index(uri: Any, writer: str | None = None) -> pa.Table:
    return ipc.open_file(pa.py_buffer(read_object(uri, index_of(uri, writer)))).read_all()


def edit_index(uri: Any, fn: Callable[[pa.Table], pa.Table], writer: str | None = None) -> None:
    """Replace a writer's index by ``fn(index)`` (same object name) and re-list it (rows,
    bytes, digest) in its manifest: an index consistent with its manifest, whatever it says."""
    from replay_bridge.shards._index import index_bytes

    name = index_of(uri, writer)
    table = fn(read_index(uri, writer))
    write_object(uri, name, index_bytes(table))
    relist(uri, name, writer)
    edit_manifest(uri, lambda doc: doc["index"].update(rows=table.num_rows), writer)


def rewrite_shard(uri: Any, name: str, fn: Callable[[pa.Table], pa.Table],
                  writer: str | None = None) -> None:
    """Replace a shard by ``fn(its table)`` written with plain pyarrow, then make the dataset
    consistent in every other respect: the manifest entry's size and sha256, and the writer's
    index rows of that shard (ids, record batches, byte ranges, checksums of the writer's
    format). Counts (rows, tokens) in the manifest are left as they were."""
    writer = writer or SHARD_RE.fullmatch(name).group("writer")
    with ipc.open_file(pa.py_buffer(read_object(uri, name))) as f:
        table = f.read_all()
    table = fn(table)
    sink = pa.BufferOutputStream()
    blocks = []
    header = 8 + table.schema.serialize().size
    with ipc.new_file(sink, table.schema) as w:
        for i, batch in enumerate(table.to_batches()):
            start = header if i == 0 else sink.tell()
            w.write_batch(batch)
            blocks.append((batch, start, sink.tell() - start))
    data = sink.getvalue().to_pybytes()
    write_object(uri, name, data)
    relist(uri, name, writer)

    doc = manifest_doc(uri, writer)
    checksums = checksums_for(doc["format_version"])
    pos = [e["file"] for e in doc["shards"]].index(name)
    rows = []
    for b, (batch, start, length) in enumerate(blocks):
        crc = checksums.block(data[start:start + length])
        n = batch.num_rows
        ids = pc.fill_null(batch.column("sample_id"), "") if n else batch.column("sample_id")
        tokens = batch.column("tokens")
        rows.append(pa.table([
            pa.array(ids.to_pylist(), pa.string()),
            pa.array(np.zeros(n, np.int8)),
            pa.nulls(n, pa.string()),
            pa.array(batch.column("group_id").to_pylist(), pa.string()),
            pa.array(np.full(n, pos, np.int32)), pa.array(np.full(n, b, np.int32)),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(np.full(n, start, np.int64)), pa.array(np.full(n, length, np.int64)),
            pa.array(np.full(n, crc, np.uint64), checksums.block_type),
            pa.array([len(t or ()) for t in tokens.to_pylist()], pa.int32()),
            pa.array([_int32(v) for v in batch.column("prompt_len").to_pylist()], pa.int32()),
            pa.array([_int32(v) for v in batch.column("routed_start").to_pylist()], pa.int32()),
        ], schema=index_schema(doc["format_version"])))

    def swap(index: pa.Table) -> pa.Table:
        shard = index.column("shard").to_numpy()
        parts = [index.filter(pa.array((shard >= 0) & (shard < pos))), *rows,
                 index.filter(pa.array(shard > pos)), index.filter(pa.array(shard < 0))]
        return pa.concat_tables(parts).combine_chunks()
    edit_index(uri, swap, writer)


def _int32(v: Any) -> int:
    return v if isinstance(v, int) and -(2**31) <= v < 2**31 else 0


def batch_range(uri: Any, name: str, batch: int = 0) -> tuple[int, int]:
    """``(offset, length)`` of a shard's record batch, from its writer's index."""
    writer = SHARD_RE.fullmatch(name).group("writer")
    pos = [e["file"] for e in manifest_doc(uri, writer)["shards"]].index(name)
    t = read_index(uri, writer)
    mask = pc.and_(pc.equal(t.column("shard"), pos), pc.equal(t.column("batch"), batch))
    row = t.filter(mask).slice(0, 1)
    assert row.num_rows, f"{name} has no record batch {batch}"
    return row.column("offset")[0].as_py(), row.column("length")[0].as_py()


def corrupt_batch(uri: Any, name: str, batch: int = 0) -> None:
    """Flip bytes in the middle of one record batch of a shard (overwriting the object)."""
    offset, length = batch_range(uri, name, batch)
    data = bytearray(read_object(uri, name))
    for i in range(offset + length // 2, offset + length // 2 + min(16, length // 4)):
        data[i] ^= 0xA5
    write_object(uri, name, bytes(data))
