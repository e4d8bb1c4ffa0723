"""Read a dataset: by sample id, a subset of ids, in storage order, or as Arrow record batches.

Opening reads the writers' manifests and compact indexes, never a shard. A sample is found
through the index (object, record batch, row) and its record batch is fetched as one byte
range (a slice of a memory map locally, a ranged read on an object store), checked against
the checksum the writer recorded for it, decoded and kept in a small cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from ..geometry import RoutingGeometry
from ..sample import RoutedSample
from ._checksum import checksums_for
from ._dataset import DatasetView
from ._errors import ShardError
from ._manifest import Manifest, QuarantineEntry, ShardEntry, check_listed
from ._quarantine import read_chunk
from ._rules import RuleBreak, batch_breaks
from ._schema import (FORMAT_VERSION, READ_VERSIONS, check_schema, list_parts, routed_rows,
                      samples_from_batch, schema_for, upgrade_batch)
from ._store import Store, open_store

__all__ = ["ShardReader", "default_read_threads", "verify_object"]

Verify = bool | Literal["read", "lazy", "all"]
Breaks = dict[int, RuleBreak]
"""The rows of a record batch that break a storage rule (:mod:`._rules`), by row."""
INDEX_COLUMNS = ("sample_id", "group_id", "tokens", "prompt_len", "routed_start")


def verify_object(store: Store, entry: ShardEntry | QuarantineEntry) -> None:
    """Check a listed object's size and digest against its manifest entry."""
    info = store.info(entry.file)
    if info is None:
        raise ShardError(f"{entry.file}: listed in the manifest but missing",
                         file=entry.file, kind="missing")
    if not info.regular:
        store.read(entry.file, 0)  # raises, naming what it is
    check_listed(entry, info.size)  # before hashing: a truncated object is not read
    check_listed(entry, info.size, store.digest(entry.file, entry.algorithm))


def _check_counts(view: DatasetView) -> None:
    """Each listed shard's samples and tokens as its writer's index lists them must be what
    the manifest says (both are untrusted; a reader trusts neither alone)."""
    n = len(view.objects)
    if not n:
        return
    stored = view.index.column("outcome").to_numpy() == 0
    obj = view.index.column("object").to_numpy()[stored]
    rows = np.bincount(obj, minlength=n)
    tokens = np.bincount(obj, weights=view.index.column("tokens").to_numpy()[stored],
                         minlength=n)
    for i, (m, pos) in enumerate(view.objects):
        e = m.shards[pos]
        if rows[i] != e.rows or int(tokens[i]) != e.tokens:
            raise ShardError(f"{e.file}: its index lists {rows[i]} samples / {int(tokens[i])} "
                             f"tokens, the manifest says {e.rows} / {e.tokens}", file=e.file,
                             kind="counts")


def _check_shard_schema(store: Store, name: str, geometry: RoutingGeometry,
                        version: int) -> None:
    """A shard's own schema (read from its footer) must carry the dataset's geometry and the
    format its manifest says."""
    try:
        with store.open(name) as f:
            schema = ipc.open_file(f).schema
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{name}: not a readable Arrow IPC file ({e})", file=name) from None
    check_schema(schema, name, geometry, version=version)


def _mode(verify: Verify) -> str | bool:
    if verify is True or verify == "all":
        return "all"
    if verify in ("read", "lazy"):
        return "read"
    if verify is False:
        return False
    raise ValueError(f"verify must be 'read', True ('all') or False, got {verify!r}")


class ShardReader:
    """A read-only view of a dataset (a local path or any ``pyarrow.fs`` URI).

    ``verify="read"`` (default) checks each record batch's bytes against the checksum its
    writer recorded, the first time that batch is read; ``True`` (``"all"``) also hashes every
    listed shard whole on open; ``False`` checks nothing but sizes and Arrow's own
    validation. Every record batch read is Arrow-validated and its rows are checked against
    the storage rules.

    When two writers stored the same sample id, the copy of the writer that started first is
    read (:attr:`duplicates` lists the others). A reader pickles as its URI and the shards it
    saw; the copy reopens lazily, reading exactly those shards.
    """

    def __init__(self, uri: str | os.PathLike[str], verify: Verify = "read",
                 cache_batches: int = 4) -> None:
        self._verify = _mode(verify)
        self._uri = uri if isinstance(uri, Store) else os.fspath(uri)
        self._cache_size = max(int(cache_batches), 1)
        self._snapshot: dict[str, list[str]] | None = None
        self._view: DatasetView | None = None
        self._load()

    # ---- opening -------------------------------------------------------------------------

    def _load(self) -> None:
        store = open_store(self._uri)
        view = DatasetView.load(store, self._snapshot)
        self._store = store
        self._view = view
        self.geometry: RoutingGeometry = view.geometry
        self._schemas = {v: schema_for(self.geometry, v) for v in READ_VERSIONS}
        """Each format's schema: a record batch is decoded with its shard's (its manifest's)."""
        t = view.stored
        self._ids = t.column("sample_id").combine_chunks()
        self._obj = t.column("object").to_numpy()
        self._batchno = t.column("batch").to_numpy()
        self._row = t.column("row").to_numpy()
        self._offset = t.column("offset").to_numpy()
        self._length = t.column("length").to_numpy()
        self._checksum = t.column("checksum").to_numpy()
        n = len(self._obj)
        change = np.ones(n, bool)
        if n:
            change[1:] = (self._obj[1:] != self._obj[:-1]) | (self._batchno[1:] != self._batchno[:-1])
        self._block_starts = np.flatnonzero(change)
        self._lookup: dict[str, int] | None = None
        self._cache: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
        self._files: dict[int, pa.NativeFile] = {}
        self._checked: set[tuple[int, int]] = set()
        self._merged: Manifest | None = None
        self._snapshot = {m.writer: [s.file for s in m.shards] for m in view.manifests}
        _check_counts(view)
        if self._verify == "all":
            for m in view.manifests:
                for entry in m.shards:
                    verify_object(store, entry)
                    _check_shard_schema(store, entry.file, self.geometry, m.format_version)

    @property
    def _v(self) -> DatasetView:
        if self._view is None:
            self._load()
        assert self._view is not None
        return self._view

    def __getstate__(self) -> dict[str, Any]:
        self._v  # noqa: B018 - a reader pickled before first use still names its shards
        return {"uri": self._uri, "verify": self._verify, "cache": self._cache_size,
                "snapshot": self._snapshot}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._uri, self._verify = state["uri"], state["verify"]
        self._cache_size, self._snapshot = state["cache"], state["snapshot"]
        self._view = None

    def __getattr__(self, name: str) -> Any:
        # An unpickled reader opens on first use of anything it loads.
        if name.startswith("__") or self.__dict__.get("_view", 0) is not None:
            raise AttributeError(name)
        self._load()
        return getattr(self, name)

    # ---- what the dataset holds ----------------------------------------------------------

    @property
    def uri(self) -> str:
        """The dataset's URI for display (no credentials)."""
        return self._store.display if self._view is not None else open_store(self._uri).display

    @property
    def manifest(self) -> Manifest:
        """The whole dataset as one manifest (writer ``*``): every shard and quarantine chunk,
        totals, and outcomes counting each sample id once."""
        self._v  # noqa: B018
        if self._merged is None:
            self._merged = self._view.merged()
        return self._merged

    @property
    def manifests(self) -> list[Manifest]:
        """Each writer's manifest, in start order."""
        return list(self._v.manifests)

    @property
    def duplicates(self) -> list[tuple[str, str, str]]:
        """``(sample_id, shard read, shard ignored)`` for each id two writers stored."""
        return list(self._v.duplicates)

    @property
    def index(self) -> pa.Table:
        """One row per stored sample in storage order: sample_id, group_id, tokens (count),
        prompt_len, routed_start. Read from the writers' indexes; no shard is opened."""
        return self._v.stored.select(list(INDEX_COLUMNS))

    def __len__(self) -> int:
        return len(self._v.stored)

    def _positions(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = dict(zip(self._ids.to_pylist(), range(len(self._ids))))
        return self._lookup

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and sample_id in self._positions()

    def sample_ids(self) -> list[str]:
        """Every stored id, in storage order."""
        return self._v.stored.column("sample_id").to_pylist()

    # ---- record batches ------------------------------------------------------------------

    def _file(self, obj: int) -> pa.NativeFile | pa.Buffer:
        """A shard opened: a whole-file buffer of a local memory map (slices are views), or a
        remote file (ranged reads)."""
        f = self._files.get(obj)
        if f is None:
            m, i = self._view.objects[obj]
            entry = m.shards[i]
            f = self._store.open(entry.file)
            size = f.size()
            if size != entry.bytes:
                f.close()
                what = "truncated" if size < entry.bytes else "longer than listed"
                raise ShardError(f"{entry.file}: {size} bytes, the manifest says {entry.bytes} "
                                 f"({what})", file=entry.file, kind="size")
            if self._store.local is not None:
                f = f.read_buffer()
            self._files[obj] = f
        return f

    def _range(self, obj: int, offset: int, length: int) -> pa.Buffer:
        """Bytes ``offset`` to ``offset + length`` of object ``obj``, cut at its end (a short
        buffer, which the caller refuses)."""
        f = self._file(obj)
        size = f.size if isinstance(f, pa.Buffer) else f.size()
        offset = min(offset, size)
        length = max(min(length, size - offset), 0)
        if isinstance(f, pa.Buffer):
            return f.slice(offset, length)
        return pa.py_buffer(f.read_at(length, offset))

    def _name(self, obj: int) -> str:
        return self._view.shard_file(obj)

    def _fetch(self, first: int) -> pa.RecordBatch:
        """The record batch holding stored row ``first`` (fetched, checked, decoded; a
        format-2 shard's in the current schema, with a null ``native`` column)."""
        obj, bno = int(self._obj[first]), int(self._batchno[first])
        offset, length = int(self._offset[first]), int(self._length[first])
        name = self._name(obj)
        try:
            buf = self._range(obj, offset, length)
        except OSError as e:
            raise ShardError(f"{name}: cannot read record batch {bno}: {e}", file=name) from None
        if buf.size != length:
            raise ShardError(f"{name}: record batch {bno} ends past the end of the object",
                             file=name, kind="size")
        version = self._view.objects[obj][0].format_version
        if self._verify and (obj, bno) not in self._checked:
            checksums = checksums_for(version)
            got, want = checksums.block(buf), int(self._checksum[first])
            if got != want:
                raise ShardError(f"{name}: record batch {bno} (bytes {offset}..{offset + length}) "
                                 f"has {checksums.block_algorithm} {checksums.block_text(got)}, "
                                 f"its index says {checksums.block_text(want)}: the object is "
                                 "corrupted", file=name, kind="checksum")
            self._checked.add((obj, bno))
        try:
            batch = ipc.read_record_batch(ipc.read_message(buf), self._schemas[version])
            batch.validate(full=True)
        except (OSError, EOFError, pa.ArrowException, ValueError) as e:
            raise ShardError(f"{name}: unreadable record batch {bno} ({e})", file=name) from None
        rows = self._row[first:self._block_end(first)]
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= batch.num_rows):
            raise ShardError(f"{name}: the index lists rows {int(rows.min())}..{int(rows.max())} "
                             f"of record batch {bno}, which holds {batch.num_rows}", file=name,
                             kind="index")
        return upgrade_batch(batch, self._schemas[FORMAT_VERSION])

    def _batch(self, first: int) -> pa.RecordBatch:
        key = (int(self._obj[first]), int(self._batchno[first]))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        batch = self._fetch(first)
        self._cache[key] = batch
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return batch

    def _breaks(self, batch: pa.RecordBatch, first: int) -> list[RuleBreak]:
        try:
            return batch_breaks(batch, self.geometry)
        except (pa.ArrowException, KeyError, ValueError) as e:
            name = self._name(int(self._obj[first]))
            raise ShardError(f"{name}: unreadable record batch {int(self._batchno[first])} ({e})",
                             file=name) from None

    def _refuse(self, first: int, broken: RuleBreak) -> ShardError:
        name, bno = self._name(int(self._obj[first])), int(self._batchno[first])
        where = f"row {broken.row} of record batch {bno}, storage rule {broken.rule!r}"
        head = "malformed row: " if broken.unreadable else ""
        return ShardError(f"{name}: {head}{broken.message} ({where})", file=name,
                          kind="unreadable" if broken.unreadable else "storage_rule")

    def _row_checked(self, i: int) -> tuple[pa.RecordBatch, int]:
        """The record batch of stored row ``i`` and its row there, that row checked."""
        first = self._block_of(i)
        batch = self._batch(first)
        row = int(self._row[i])
        found = self._breaks(batch.slice(row, 1), first)
        if found:
            raise self._refuse(first, found[0]._replace(row=row))
        return batch, row

    def _block_of(self, i: int) -> int:
        return int(self._block_starts[np.searchsorted(self._block_starts, i, side="right") - 1])

    # ---- lookup --------------------------------------------------------------------------

    def _locate(self, sample_id: str) -> int:
        try:
            return self._positions()[sample_id]
        except (KeyError, TypeError):
            raise KeyError(f"sample {sample_id!r} is not stored in {self.uri}") from None

    def routing(self, sample_id: str) -> np.ndarray:
        """``[rows, num_moe_layers, top_k]`` ids of one sample: a read-only view, no copy."""
        i = self._locate(sample_id)
        batch, row = self._row_checked(i)
        offsets, values = list_parts(batch.column("routed"))
        return routed_rows(values, int(offsets[row]), int(offsets[row + 1]), self.geometry,
                           self._name(int(self._obj[i])), sample_id)

    def __getitem__(self, sample_id: str) -> RoutedSample:
        i = self._locate(sample_id)
        batch, row = self._row_checked(i)
        return samples_from_batch(batch.slice(row, 1), self.geometry,
                                  self._name(int(self._obj[i])))[0]

    def get(self, sample_id: str, default: Any = None) -> RoutedSample | Any:
        return self[sample_id] if sample_id in self else default

    def read(self, sample_ids: Sequence[str], threads: int | None = None) -> list[RoutedSample]:
        """The samples of ``sample_ids``, in the order asked, reading only the record batches
        that hold them (``threads`` fetch and decode batches in parallel; default: up to 4 on
        remote storage, 1 locally). :class:`KeyError` naming the first id not stored."""
        self._v  # noqa: B018
        if not len(sample_ids):
            return []
        asked = pa.array(list(sample_ids), pa.string())
        pos = pc.index_in(asked, value_set=self._ids)
        if pos.null_count:
            missing = asked.filter(pc.is_null(pos))[0].as_py()
            raise KeyError(f"sample {missing!r} is not stored in {self.uri}")
        pos = pos.to_numpy()
        blocks = self._block_starts[np.searchsorted(self._block_starts, pos, side="right") - 1]
        order = np.argsort(blocks, kind="stable")
        uniq, starts = np.unique(blocks[order], return_index=True)
        n = threads if threads is not None else (1 if self._store.local is not None
                                                 else default_read_threads())
        if n > 1 and len(uniq) > 1:
            with ThreadPoolExecutor(min(n, len(uniq)), thread_name_prefix="shard-read") as ex:
                batches = list(ex.map(self._fetch, uniq.tolist()))
        else:
            batches = [self._batch(int(b)) for b in uniq]
        out: list[RoutedSample | None] = [None] * len(pos)
        bounds = list(starts) + [len(order)]
        for j, batch in enumerate(batches):
            where = order[bounds[j]:bounds[j + 1]]
            rows = self._row[pos[where]]
            part = batch.take(pa.array(rows))
            found = self._breaks(part, int(uniq[j]))
            if found:
                raise self._refuse(int(uniq[j]), found[0]._replace(row=int(rows[found[0].row])))
            for k, s in zip(where.tolist(), samples_from_batch(part, self.geometry,
                                                              self._name(int(self._obj[uniq[j]])))):
                out[k] = s
        return out  # type: ignore[return-value]

    # ---- iteration -----------------------------------------------------------------------

    def _kept_rows(self, j: int) -> np.ndarray:
        """The rows of block ``j`` that are read (all but copies of a duplicated id)."""
        a = int(self._block_starts[j])
        return self._row[a:self._block_end(a)]

    def _block_end(self, first: int) -> int:
        """One past the last stored row of the block starting at stored row ``first``."""
        j = int(np.searchsorted(self._block_starts, first, side="right"))
        return int(self._block_starts[j]) if j < len(self._block_starts) else len(self._obj)

    def _checked_block(self, j: int) -> tuple[pa.RecordBatch, Breaks]:
        first = int(self._block_starts[j])
        batch = self._fetch(first)
        rows = self._kept_rows(j)
        if len(rows) != batch.num_rows or (rows != np.arange(len(rows))).any():
            batch = batch.take(pa.array(rows))
        return batch, {b.row: b for b in self._breaks(batch, first)}

    def _batches(self, threads: int | None) -> Iterator[tuple[int, pa.RecordBatch, Breaks]]:
        self._v  # noqa: B018
        if threads is None:
            local_plain = self._store.local is not None and self.manifest.compression == "none"
            threads = 1 if local_plain else default_read_threads()
        n = max(int(threads), 1)
        jobs = range(len(self._block_starts))
        if n == 1:
            for j in jobs:
                yield j, *self._checked_block(j)
            return
        # Fetching and decompressing release the GIL: read ahead on a few threads, in order.
        ex = ThreadPoolExecutor(n, thread_name_prefix="shard-read")
        pending: deque[tuple[int, Future[tuple[pa.RecordBatch, Breaks]]]] = deque()
        try:
            for j in jobs:
                pending.append((j, ex.submit(self._checked_block, j)))
                if len(pending) > 2 * n:
                    j0, fut = pending.popleft()
                    yield j0, *fut.result()
            while pending:
                j0, fut = pending.popleft()
                yield j0, *fut.result()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def default_read_threads() -> int:
        """Read-ahead threads of :meth:`iter_batches` by default: the CPUs this process may
        use, at most 4."""
        return default_read_threads()

    def iter_batches(self, threads: int | None = None) -> Iterator[pa.RecordBatch]:
        """Every record batch, in storage order (the current shard schema, metadata included;
        a format-2 shard's batches with a null ``native`` column).
        ``threads`` read ahead and decompress in parallel (default: up to 4 CPUs, none for
        uncompressed local shards). A batch with a row that breaks a storage rule is a
        :class:`ShardError` naming the sample."""
        for j, batch, breaks in self._batches(threads):
            if breaks:
                raise self._refuse(int(self._block_starts[j]), breaks[min(breaks)])
            yield batch

    def __iter__(self) -> Iterator[RoutedSample]:
        """Every sample in storage order; a :class:`ShardError` naming the sample at the first
        row that breaks a storage rule."""
        for j, batch, breaks in self._batches(None):
            first = int(self._block_starts[j])
            name = self._name(int(self._obj[first]))
            if breaks:
                bad = min(breaks)
                yield from samples_from_batch(batch.slice(0, bad), self.geometry, name)
                raise self._refuse(first, breaks[bad])
            yield from samples_from_batch(batch, self.geometry, name)

    def quarantined(self) -> Iterator[dict[str, Any]]:
        """Quarantine records (rejected and failed samples): writers in start order, each
        writer's oldest first."""
        for m in self._v.manifests:
            for entry in m.quarantine:
                yield from read_chunk(self._store, entry.file,
                                      listed=entry if self._verify else None)

    def close(self) -> None:
        """Drop cached batches and open files (views handed out stay valid)."""
        if self._view is None:
            return
        self._cache.clear()
        for f in self._files.values():
            if not isinstance(f, pa.Buffer):
                f.close()
        self._files.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._view is None:
            return "ShardReader(<not opened>)"
        return (f"ShardReader({self.uri!r}: {len(self)} samples in "
                f"{len(self._view.objects)} shards, {self.geometry.describe()})")


def default_read_threads() -> int:
    """Read-ahead threads of `iter_batches`: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))
