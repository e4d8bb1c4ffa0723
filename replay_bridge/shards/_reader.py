"""Read a shard directory: by sample id, in storage order, or as Arrow record batches."""

from __future__ import annotations

import os
import stat
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..geometry import RoutingGeometry
from ..sample import RoutedSample
from ._atomic import sha256_file
from ._errors import ShardError
from ._manifest import QUARANTINE_RE, SHARD_RE, Manifest, QuarantineEntry, ShardEntry, member_path
from ._quarantine import read_chunk
from ._rules import RuleBreak, batch_breaks
from ._scan import open_ipc, regular_file, scan_shard
from ._schema import list_parts, routed_rows, samples_from_batch

__all__ = ["ShardReader", "default_read_threads", "verify_file"]

Verify = bool | Literal["lazy"]
Breaks = dict[int, RuleBreak]
"""The rows of a record batch that break a storage rule (:mod:`._rules`), by row."""


def verify_file(directory: Path, entry: ShardEntry | QuarantineEntry) -> Path:
    """Check a listed file's size and sha256 against the manifest; return its path."""
    pattern = SHARD_RE if isinstance(entry, ShardEntry) else QUARANTINE_RE
    path = member_path(directory, entry.file, pattern)
    _check_size(path, entry)
    try:
        with regular_file(path, entry.file) as p:
            digest = sha256_file(p)
    except OSError as e:
        raise ShardError(f"{entry.file}: cannot read: {e.strerror or e}", file=entry.file) from None
    if digest != entry.sha256:
        raise ShardError(f"{entry.file}: sha256 {digest[:16]}... does not match the manifest "
                         f"({entry.sha256[:16]}...): the file is corrupted", file=entry.file,
                         kind="checksum")
    return path


def _check_size(path: Path, entry: ShardEntry | QuarantineEntry) -> None:
    """The listed file is a regular file of the listed size (``stat`` only: nothing opened)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{entry.file}: listed in the manifest but missing",
                         file=entry.file, kind="missing") from None
    except OSError as e:
        raise ShardError(f"{entry.file}: cannot stat: {e.strerror or e}",
                         file=entry.file) from None
    if not stat.S_ISREG(st.st_mode):
        with regular_file(path, entry.file):  # raises, naming what it is
            pass
    size = st.st_size
    if size != entry.bytes:
        what = "truncated" if size < entry.bytes else "longer than listed"
        raise ShardError(f"{entry.file}: {size} bytes, the manifest says {entry.bytes} "
                         f"({what})", file=entry.file, kind="size")


class _Shard:
    """One listed shard file, opened (memory-mapped) on first use."""

    def __init__(self, directory: Path, entry: ShardEntry, geometry: RoutingGeometry) -> None:
        self.entry = entry
        self.path = member_path(directory, entry.file, SHARD_RE)
        self.geometry = geometry
        self.verified = False
        self._reader: ipc.RecordBatchFileReader | None = None

    def verify(self, directory: Path) -> None:
        if not self.verified:
            verify_file(directory, self.entry)
            self.verified = True

    @property
    def reader(self) -> ipc.RecordBatchFileReader:
        if self._reader is None:
            self._reader = open_ipc(self.path, self.entry.file, self.geometry)
        return self._reader

    def release(self) -> None:
        self._reader = None

    def batch(self, i: int) -> pa.RecordBatch:
        """Record batch ``i``, Arrow-validated."""
        try:
            batch = self.reader.get_batch(i)
            batch.validate(full=True)
            return batch
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{self.entry.file}: unreadable record batch {i} ({e})",
                             file=self.entry.file) from None

    def checked(self, i: int) -> tuple[pa.RecordBatch, Breaks]:
        """Record batch ``i`` with the rows that break a storage rule (the whole batch)."""
        batch = self.batch(i)
        return batch, {b.row: b for b in self._breaks(batch, i)}

    def row_break(self, batch: pa.RecordBatch, i: int, row: int) -> RuleBreak | None:
        """The storage rule one row of record batch ``i`` breaks (only that row is read)."""
        found = self._breaks(batch.slice(row, 1), i)
        return found[0]._replace(row=row) if found else None

    def _breaks(self, batch: pa.RecordBatch, i: int) -> list[RuleBreak]:
        try:
            return batch_breaks(batch, self.geometry)
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise ShardError(f"{self.entry.file}: unreadable record batch {i} ({e})",
                             file=self.entry.file) from None

    def refuse(self, i: int, broken: RuleBreak) -> ShardError:
        """The error for a row of record batch ``i`` that breaks a storage rule."""
        where = f"row {broken.row} of record batch {i}, storage rule {broken.rule!r}"
        head = "malformed row: " if broken.unreadable else ""
        return ShardError(f"{self.entry.file}: {head}{broken.message} ({where})",
                          file=self.entry.file,
                          kind="unreadable" if broken.unreadable else "storage_rule")


class ShardReader:
    """A read-only view of a shard directory.

    ``verify=True`` checks the sha256 of every listed file on open, ``"lazy"`` before a shard's
    first record batch is read, ``False`` never (sizes are always checked). The id index is
    built from the ``sample_id`` columns on open. Uncompressed shards are memory-mapped and
    :meth:`routing` returns views of the file; compressed ones are decompressed one record batch
    at a time (the last ``cache_batches`` are kept).
    """

    def __init__(self, directory: str | os.PathLike[str], verify: Verify = True,
                 cache_batches: int = 4) -> None:
        if verify not in (True, False, "lazy"):
            raise ValueError(f"verify must be True, False or 'lazy', got {verify!r}")
        self.dir = Path(directory)
        self._verify = verify
        self.manifest = Manifest.read(self.dir)
        self.geometry: RoutingGeometry = self.manifest.geometry
        self._shards = [_Shard(self.dir, e, self.geometry) for e in self.manifest.shards]
        self._cache: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
        self._cache_size = max(int(cache_batches), 1)
        self._ids: list[str] = []
        locs: list[np.ndarray] = []
        for si, shard in enumerate(self._shards):
            _check_size(shard.path, shard.entry)
            if verify is True:
                shard.verify(self.dir)
            scan = scan_shard(shard.path, shard.entry.file, self.geometry, what="tokens")
            if scan.rows != shard.entry.rows or scan.tokens != shard.entry.tokens:
                raise ShardError(
                    f"{shard.entry.file}: holds {scan.rows} samples / {scan.tokens} tokens, the "
                    f"manifest says {shard.entry.rows} / {shard.entry.tokens}",
                    file=shard.entry.file, kind="counts")
            self._ids.extend(scan.ids)
            counts = np.asarray(scan.batch_rows, dtype=np.int64)
            batch = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
            starts = np.cumsum(counts) - counts
            row = (np.arange(scan.rows, dtype=np.int64) - np.repeat(starts, counts)).astype(
                np.int32)
            locs.append(np.stack([np.full(scan.rows, si, np.int32), batch, row], axis=1))
        self._loc = np.concatenate(locs) if locs else np.empty((0, 3), np.int32)
        self._index = dict(zip(self._ids, range(len(self._ids))))
        if len(self._index) != len(self._ids):
            raise ShardError(_duplicates_message(self._ids, self._loc, self._shards),
                             kind="duplicate_id")

    # ---- lookup --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def sample_ids(self) -> list[str]:
        """Every stored id, in storage order."""
        return list(self._ids)

    def _locate(self, sample_id: str) -> tuple[int, int, int]:
        try:
            i = self._index[sample_id]
        except (KeyError, TypeError):
            raise KeyError(f"sample {sample_id!r} is not stored in {self.dir}") from None
        s, b, r = self._loc[i]
        return int(s), int(b), int(r)

    def _batch(self, si: int, bi: int) -> pa.RecordBatch:
        key = (si, bi)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shard = self._shards[si]
        if self._verify:
            shard.verify(self.dir)
        batch = shard.batch(bi)
        self._cache[key] = batch
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return batch

    def _row(self, sample_id: str) -> tuple[pa.RecordBatch, int, str]:
        """The record batch holding ``sample_id``, its row, and its file name; ShardError when
        the row breaks a storage rule (a lookup checks its own row, not the whole batch)."""
        si, bi, row = self._locate(sample_id)
        batch = self._batch(si, bi)
        broken = self._shards[si].row_break(batch, bi, row)
        if broken is not None:
            raise self._shards[si].refuse(bi, broken)
        return batch, row, self._shards[si].entry.file

    def routing(self, sample_id: str) -> np.ndarray:
        """``[rows, num_moe_layers, top_k]`` ids of one sample: a read-only view, no copy."""
        batch, row, name = self._row(sample_id)
        offsets, values = list_parts(batch.column("routed"))
        return routed_rows(values, int(offsets[row]), int(offsets[row + 1]), self.geometry,
                           name, sample_id)

    def __getitem__(self, sample_id: str) -> RoutedSample:
        batch, row, name = self._row(sample_id)
        return samples_from_batch(batch.slice(row, 1), self.geometry, name)[0]

    def get(self, sample_id: str, default: Any = None) -> RoutedSample | Any:
        return self[sample_id] if sample_id in self._index else default

    # ---- iteration -----------------------------------------------------------------------

    def _jobs(self) -> Iterator[tuple[int, int]]:
        """``(shard, batch)`` in storage order; each shard is verified and opened here, on
        the caller's thread, before its first batch is handed out."""
        for si, shard in enumerate(self._shards):
            if self._verify:
                shard.verify(self.dir)
            for bi in range(shard.reader.num_record_batches):
                yield si, bi

    def _batches(self, threads: int | None
                 ) -> Iterator[tuple[int, int, pa.RecordBatch, Breaks]]:
        if threads is None:  # mapped, uncompressed batches cost nothing to read: no threads
            threads = 1 if self.manifest.compression == "none" else default_read_threads()
        n = max(int(threads), 1)
        if n == 1:
            for si, bi in self._jobs():
                yield si, bi, *self._shards[si].checked(bi)
            return
        # Decompression releases the GIL: read ahead on a few threads, yield in order.
        ex = ThreadPoolExecutor(n, thread_name_prefix="shard-read")
        pending: deque[tuple[int, int, Future[tuple[pa.RecordBatch, Breaks]]]] = deque()
        jobs = self._jobs()
        try:
            for si, bi in jobs:
                pending.append((si, bi, ex.submit(self._shards[si].checked, bi)))
                if len(pending) > 2 * n:
                    si0, bi0, fut = pending.popleft()
                    yield si0, bi0, *fut.result()
            while pending:
                si0, bi0, fut = pending.popleft()
                yield si0, bi0, *fut.result()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def default_read_threads() -> int:
        """Read-ahead threads of :meth:`iter_batches` on compressed shards by default: the
        CPUs this process may use, at most 4."""
        return default_read_threads()

    def iter_batches(self, threads: int | None = None) -> Iterator[pa.RecordBatch]:
        """Every record batch, in storage order (the shard schema, metadata included).
        ``threads`` read ahead and decompress in parallel (default: up to 4 CPUs for
        compressed shards, none for uncompressed ones). A batch with a row that breaks a
        storage rule is a :class:`ShardError` naming the sample."""
        for si, bi, batch, breaks in self._batches(threads):
            if breaks:
                raise self._shards[si].refuse(bi, breaks[min(breaks)])
            yield batch

    def __iter__(self) -> Iterator[RoutedSample]:
        """Every sample in storage order; a :class:`ShardError` naming the sample at the first
        row that breaks a storage rule."""
        for si, bi, batch, breaks in self._batches(None):
            name = self._shards[si].entry.file
            if breaks:
                first = min(breaks)
                yield from samples_from_batch(batch.slice(0, first), self.geometry, name)
                raise self._shards[si].refuse(bi, breaks[first])
            yield from samples_from_batch(batch, self.geometry, name)

    def quarantined(self) -> Iterator[dict[str, Any]]:
        """Quarantine records (rejected and failed samples), oldest first."""
        for entry in self.manifest.quarantine:
            path = (verify_file(self.dir, entry) if self._verify
                    else member_path(self.dir, entry.file, QUARANTINE_RE))
            yield from read_chunk(path, entry.file)

    def close(self) -> None:
        """Drop the cached batches and memory maps (views handed out stay valid)."""
        self._cache.clear()
        for shard in self._shards:
            shard.release()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardReader({str(self.dir)!r}: {len(self)} samples in {len(self._shards)} "
                f"shards, {self.geometry.describe()})")


def default_read_threads() -> int:
    """Read-ahead threads of `iter_batches`: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _duplicates_message(ids: list[str], loc: np.ndarray, shards: list[_Shard]) -> str:
    seen: dict[str, int] = {}
    dups = []
    for i, sid in enumerate(ids):
        if sid in seen:
            dups.append((sid, shards[loc[seen[sid], 0]].entry.file, shards[loc[i, 0]].entry.file))
        else:
            seen[sid] = i
    shown = "; ".join(f"{s!r} in {a} and {b}" for s, a, b in dups[:5])
    return f"{len(dups)} sample ids stored twice: {shown}"
