"""Append checked samples to a shard directory, crash-safely."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..checks import CheckReport
from ..geometry import RoutingGeometry
from ..sample import RoutedSample, WireSample, with_routing
from ._atomic import TMP_SUFFIX, HashingFile, fsync_dir, remove_stray, sha256_file
from ._errors import DuplicateSample, ShardError
from ._manifest import (MANIFEST, QUARANTINE_RE, SHARD_RE, Manifest, QuarantineEntry,
                        ShardEntry, is_member_name, is_temp_name, quarantine_name, shard_name)
from ._quarantine import (ChunkWriter, OutcomeLedger, failure_record, outcome_of, read_chunk,
                          rejection_record)
from ._rules import conform
from ._schema import schema_for, to_record_batch
from ._scan import scan_shard

__all__ = ["COMPRESSIONS", "ShardStats", "ShardWriter"]

COMPRESSIONS = ("zstd", "lz4", "none")


@dataclass(frozen=True)
class ShardStats:
    """Counts of a writer's directory: samples stored (sealed or pending), quarantined
    (rejected), failed (each quarantined id once, under its latest outcome; stored ids count
    only as stored); tokens stored; bytes of sealed shard files."""

    stored: int
    quarantined: int
    failed: int
    tokens: int
    bytes: int
    shards: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _codec(compression: str | None, level: int | None) -> pa.Codec | None:
    name = "none" if compression is None else str(compression).lower()
    if name not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if name == "none":
        return None
    return pa.Codec(name, compression_level=level) if level is not None else pa.Codec(name)


class ShardWriter:
    """Write :class:`RoutedSample` s as Arrow IPC shards plus ``manifest.json``.

    Samples go to ``shard-NNNNNN.arrow.tmp`` in record batches of about ``batch_bytes`` of
    routing; a shard is sealed (footer, fsync, rename) every ``samples_per_shard`` samples, on
    :meth:`flush` and on :meth:`close`, and the manifest is rewritten atomically after each
    seal. ``batch_bytes`` trades compressed random lookups (one record batch is decompressed
    per lookup) against per-batch overhead. A writer killed at any instant leaves only complete
    shards; samples of the open shard are not stored (``stored_ids`` of a resumed writer says
    which are).

    Quarantine records are written to the open chunk ``quarantine-NNNNNN.jsonl.tmp`` as they
    come (never kept in memory), and the chunk is sealed and listed at every flush and whenever
    it reaches ``quarantine_bytes`` or ``quarantine_records``; a kill loses at most the open
    chunk. A record is not written again for an id whose latest record has the same outcome
    and kinds (a resumed run meeting the same rejected sample).

    :meth:`add` is :meth:`claim` (check that the sample fits, take its id) then :meth:`append`
    (batch, compress, write). Not thread-safe: use it from one thread, with one exception: the
    ids (``claim``, ``in``, ``stored_ids``) may be used from one thread while ``append``,
    ``quarantine``, ``record_failure`` and ``flush`` run on another, as
    :class:`~replay_bridge.sink.SampleSink` does to overlap compression with checking.
    """

    DEFAULT_BATCH_BYTES = 2 << 20
    DEFAULT_QUARANTINE_BYTES = 64 << 20
    DEFAULT_QUARANTINE_RECORDS = 1024

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        geometry: RoutingGeometry,
        *,
        samples_per_shard: int = 1024,
        compression: str | None = "zstd",
        compression_level: int | None = None,
        batch_bytes: int | None = None,
        quarantine_bytes: int | None = None,
        quarantine_records: int | None = None,
        resume: bool = False,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.dir = Path(out_dir)
        self.geometry = geometry
        self.samples_per_shard = int(samples_per_shard)
        self.batch_bytes = max(int(batch_bytes or self.DEFAULT_BATCH_BYTES), 1)
        self.quarantine_bytes = max(int(quarantine_bytes or self.DEFAULT_QUARANTINE_BYTES), 1)
        self.quarantine_records = max(
            int(quarantine_records or self.DEFAULT_QUARANTINE_RECORDS), 1)
        self._codec = _codec(compression, compression_level)
        self._options = ipc.IpcWriteOptions(compression=self._codec)
        self._schema = schema_for(geometry)
        self._ids: set[str] = set()
        """Ids claimed by this writer."""
        self._earlier: set[str] = set()
        """Ids stored by an earlier run (a resumed directory)."""
        self._unsealed: set[str] = set()
        """Ids claimed, not yet in a sealed shard."""
        self._open_ids: list[str] = []
        self._batch: list[RoutedSample] = []
        self._batch_bytes = 0
        self._open_rows = 0
        self._open_tokens = 0
        self._open_routed_rows = 0
        self._sink: HashingFile | None = None
        self._ipc: ipc.RecordBatchFileWriter | None = None
        self._chunk: ChunkWriter | None = None
        self._last: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Outcome and kinds of each quarantined id's latest record (listed or open chunk)."""
        self._ledger = OutcomeLedger()
        self._pending_tokens = 0
        self._closed = False
        comp = "none" if self._codec is None else self._codec.name
        if self.dir.exists() and not self.dir.is_dir():
            raise ShardError(f"{self.dir} is not a directory")
        if os.path.lexists(self.dir / MANIFEST):
            if not resume:
                raise ShardError(f"{self.dir} already holds shards; pass resume=True to append")
            self._manifest = Manifest.read(self.dir)
            self._manifest.geometry.require_same(geometry, "resumed shard geometry and writer")
            self._manifest.compression = comp
            self._recover()
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            strays = [p.name for p in self.dir.iterdir() if is_member_name(p.name)]
            if strays:
                raise ShardError(f"{self.dir} holds shard files but no {MANIFEST}: {strays[:3]}")
            self._manifest = Manifest(geometry=geometry, compression=comp)
            self._write_manifest()

    # ---- resume --------------------------------------------------------------------------

    def _recover(self) -> None:
        """Drop temp files, adopt complete files renamed before the manifest caught up, load
        the stored ids and each quarantined id's latest record, and recount the outcomes."""
        for p in self.dir.iterdir():
            if is_temp_name(p.name):
                remove_stray(p)
        m = self._manifest
        listed = m.files
        for p in sorted(self.dir.iterdir()):
            if p.name in listed or p.is_symlink() or not p.is_file():
                continue
            if SHARD_RE.fullmatch(p.name):
                scan = scan_shard(p, p.name, m.geometry)
                m.shards.append(ShardEntry(p.name, scan.rows, scan.tokens, scan.routed_rows,
                                           p.stat().st_size, sha256_file(p)))
            elif QUARANTINE_RE.fullmatch(p.name):
                n = sum(1 for _ in read_chunk(p, p.name))
                m.quarantine.append(QuarantineEntry(p.name, n, p.stat().st_size,
                                                    sha256_file(p)))
        for e in m.shards:
            path = self._listed_file(e.file, e.bytes)
            ids = scan_shard(path, e.file, m.geometry, what="ids").ids
            dup = self._earlier.intersection(ids)
            if dup:
                raise ShardError(f"{e.file}: sample ids stored twice: {sorted(dup)[:5]}",
                                 file=e.file)
            self._earlier.update(ids)
        for q in m.quarantine:
            for rec in read_chunk(self._listed_file(q.file, q.bytes), q.file):
                sid, outcome = rec["sample_id"], outcome_of(rec)
                kinds = rec.get("kinds")
                self._last[sid] = (outcome, tuple(kinds) if isinstance(kinds, list) else ())
                self._ledger.record(sid, outcome, stored=sid in self._earlier)
        self._write_manifest()

    def _listed_file(self, name: str, size: int) -> Path:
        path = self.dir / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
            raise ShardError(f"{name}: missing, not a regular file or not {size} bytes; run "
                             "validate", file=name)
        return path

    # ---- public --------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def stored_ids(self) -> frozenset[str]:
        """Ids stored in sealed shards or pending in the open one."""
        return frozenset(self._ids | self._earlier)

    def __contains__(self, sample_id: object) -> bool:
        """Whether ``sample_id`` is stored: in a sealed shard (this run's or, resumed, an
        earlier run's) or pending in the open one."""
        return sample_id in self._ids or sample_id in self._earlier

    def stored_earlier(self, sample_id: object) -> bool:
        """Whether ``sample_id`` was stored by an earlier run (a resumed directory), not by
        this writer."""
        return sample_id in self._earlier

    @property
    def stats(self) -> ShardStats:
        m = self._manifest
        pending = self._chunk.entries if self._chunk is not None else ()
        counts = self._ledger.counts_with(((sid, outcome) for sid, outcome, _ in pending),
                                          self._sealed)
        return ShardStats(
            stored=m.samples + self._open_rows + len(self._batch),
            quarantined=counts["rejected"],
            failed=counts["failed"],
            tokens=m.tokens + self._open_tokens + self._pending_tokens,
            bytes=m.bytes,
            shards=len(m.shards),
        )

    def add(self, sample: RoutedSample) -> None:
        """Queue a checked sample: :meth:`claim` then :meth:`append`.

        Raises :class:`DuplicateSample` when its id is stored already and
        :class:`UnstorableSample` when it does not fit the shard (both are ``ValueError``).
        """
        self.append(self.claim(sample))

    def claim(self, sample: RoutedSample) -> RoutedSample:
        """Check that ``sample`` can be stored here and take its id; return it as it will be
        stored (ids in the geometry's dtype), for :meth:`append`.

        :class:`DuplicateSample` when the id is stored already (sealed or pending);
        :class:`UnstorableSample` when the routing's shape, dtype or ids, the tokens or the row
        offsets do not fit. Neither takes the id.
        """
        self._check_open()
        routed = self._conform(sample)
        if routed is not sample.routed:
            sample = with_routing(sample, routed)
        self._unsealed.add(sample.sample_id)  # first: an id in _ids only is a sealed one
        self._ids.add(sample.sample_id)
        return sample

    def append(self, sample: RoutedSample) -> None:
        """Queue a sample that :meth:`claim` returned; it is written with the next record
        batch and stored once its shard is sealed."""
        self._check_open()
        if sample.sample_id not in self._ids:
            raise ValueError(f"sample {sample.sample_id!r} was not claimed: pass it to "
                             "ShardWriter.claim first, or use add")
        routed = sample.routed
        self._batch.append(sample)
        self._batch_bytes += routed.nbytes
        self._pending_tokens += sample.num_tokens
        if self._batch_bytes >= self.batch_bytes:
            self._write_batch()
        if self._open_rows + len(self._batch) >= self.samples_per_shard:
            self.flush()

    def quarantine(self, report: CheckReport, sample: WireSample | RoutedSample | None = None,
                   note: str | None = None) -> None:
        """Keep a rejected sample: its report and, when decodable, its tokens and routing
        (written to the open quarantine chunk now)."""
        self._check_open()
        self._write_record(rejection_record(report, sample, note))

    def record_failure(self, sample_id: str, error: BaseException | str,
                       kind: str = "request_failed") -> None:
        """Record a sample that never came back from the engine (outcome ``failed``)."""
        self._check_open()
        self._write_record(failure_record(sample_id, error, kind))

    def flush(self) -> None:
        """Seal the open shard and the open quarantine chunk; rewrite the manifest."""
        self._check_open()
        if self._batch:
            self._write_batch()
        changed = False
        if self._ipc is not None:
            self._manifest.shards.append(self._seal())
            changed = True
        if self._chunk is not None:
            self._seal_chunk()
            changed = True
        if changed:
            self._write_manifest()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._abort_open()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the original exception is the one to report
            pass

    # ---- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"shard writer for {self.dir} is closed")

    def _conform(self, s: RoutedSample) -> np.ndarray:
        """The routing as it will be stored; :class:`DuplicateSample`, or
        :class:`UnstorableSample` naming the storage rule broken (``_rules.py``: the rules
        the reader and ``validate`` check again)."""
        if not isinstance(s, RoutedSample):
            raise TypeError(f"ShardWriter.add takes a RoutedSample, got {type(s).__name__}")
        sid = s.sample_id
        if isinstance(sid, str) and sid in self:
            raise DuplicateSample(f"sample {sid!r} is already stored in {self.dir}",
                                  sample_id=sid)
        return conform(s, self.geometry)

    def _write_batch(self) -> None:
        samples = self._batch
        self._batch, self._batch_bytes, self._pending_tokens = [], 0, 0
        try:
            batch = to_record_batch(samples, self.geometry, self._schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            samples, batch = self._storable(samples)
            if batch is None:
                return
        if self._ipc is None:
            idx = self._next_index(self._manifest.shards)
            self._sink = HashingFile(self.dir / (shard_name(idx) + TMP_SUFFIX))
            self._ipc = ipc.new_file(self._sink, self._schema, options=self._options)
        self._ipc.write_batch(batch)
        self._open_rows += batch.num_rows
        self._open_tokens += sum(s.num_tokens for s in samples)
        self._open_routed_rows += sum(s.rows for s in samples)
        self._open_ids.extend(s.sample_id for s in samples)

    def _storable(self, samples: list[RoutedSample]
                  ) -> tuple[list[RoutedSample], pa.RecordBatch | None]:
        """Arrow refused a record batch (a value that slipped past :meth:`claim`): keep every
        sample it takes alone; quarantine each one it refuses as ``unstorable`` and give its
        id back."""
        good = []
        for s in samples:
            try:
                to_record_batch([s], self.geometry, self._schema)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                sid = s.sample_id
                self._ids.discard(sid)
                self._unsealed.discard(sid)
                self._write_record(rejection_record(CheckReport(
                    sid, kinds=("unstorable",), rows=s.rows, expected_rows=s.expected_rows,
                    message=f"sample {sid!r}: unstorable: the record batch refused it "
                            f"({type(e).__name__}: {e})"), s, None))
                continue
            good.append(s)
        return good, to_record_batch(good, self.geometry, self._schema) if good else None

    def _seal(self) -> ShardEntry:
        assert self._ipc is not None and self._sink is not None
        self._ipc.close()
        self._sink.sync()
        self._sink.close()
        idx = self._next_index(self._manifest.shards)
        name = shard_name(idx)
        os.replace(self.dir / (name + TMP_SUFFIX), self.dir / name)
        fsync_dir(self.dir)
        entry = ShardEntry(name, self._open_rows, self._open_tokens, self._open_routed_rows,
                           self._sink.size, self._sink.hexdigest)
        self._ipc = self._sink = None
        self._open_rows = self._open_tokens = self._open_routed_rows = 0
        for sid in self._open_ids:
            self._ledger.stored(sid)
            self._unsealed.discard(sid)
        self._open_ids = []
        return entry

    # ---- quarantine ----------------------------------------------------------------------

    def _sealed(self, sample_id: str) -> bool:
        """Whether ``sample_id`` is in a sealed shard (this run's or an earlier one's)."""
        return sample_id in self._earlier or (sample_id in self._ids
                                              and sample_id not in self._unsealed)

    def _write_record(self, record: dict[str, Any]) -> None:
        """Append a record to the open chunk (opened if needed), unless the id's latest record
        says the same; seal the chunk once it reaches its bound."""
        sid = record["sample_id"]
        key = (outcome_of(record), tuple(record["kinds"]))
        if self._last.get(sid) == key:
            return
        if self._chunk is None:
            name = quarantine_name(self._next_index(self._manifest.quarantine))
            self._chunk = ChunkWriter(self.dir, name)
        self._chunk.write(record)
        self._last[sid] = key
        if (self._chunk.bytes >= self.quarantine_bytes
                or len(self._chunk.entries) >= self.quarantine_records):
            self._seal_chunk()
            self._write_manifest()

    def _seal_chunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None
        records, size, sha = chunk.seal()
        self._manifest.quarantine.append(QuarantineEntry(chunk.name, records, size, sha))
        for sid, outcome, _ in chunk.entries:
            self._ledger.record(sid, outcome, stored=self._sealed(sid))

    def _write_manifest(self) -> None:
        m = self._manifest
        m.outcomes = {"stored": m.samples, **self._ledger.counts}
        m.write(self.dir)

    def _abort_open(self) -> None:
        if self._sink is not None:
            self._sink.close()
        if self._chunk is not None:
            self._chunk.abort()
        self._ipc = self._sink = self._chunk = None

    @staticmethod
    def _next_index(entries: list[Any]) -> int:
        if not entries:
            return 0
        return max(int(e.file.split("-")[1].split(".")[0]) for e in entries) + 1


