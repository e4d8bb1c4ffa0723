"""Append checked samples to a shard directory, crash-safely."""

from __future__ import annotations

import os
from collections import Counter
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
from ._atomic import TMP_SUFFIX, HashingFile, atomic_write, fsync_dir, sha256_file
from ._errors import DuplicateSample, ShardError, UnstorableSample
from ._manifest import (MANIFEST, QUARANTINE_RE, SHARD_RE, Manifest, QuarantineEntry,
                        ShardEntry, is_member_name, is_temp_name, quarantine_name, shard_name)
from ._quarantine import encode_records, failure_record, outcome_of, read_chunk, rejection_record
from ._rules import conform
from ._schema import schema_for, to_record_batch
from ._scan import scan_shard

__all__ = ["COMPRESSIONS", "ShardStats", "ShardWriter"]

COMPRESSIONS = ("zstd", "lz4", "none")


@dataclass(frozen=True)
class ShardStats:
    """Counts of a writer's directory: samples stored (sealed or pending), quarantined
    (rejected), failed; tokens stored; bytes of sealed shard files."""

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

    :meth:`add` is :meth:`claim` (check that the sample fits, take its id) then :meth:`append`
    (batch, compress, write). Not thread-safe: use it from one thread, with one exception: the
    ids (``claim``, ``in``, ``stored_ids``) may be used from one thread while ``append``,
    ``quarantine``, ``record_failure`` and ``flush`` run on another, as
    :class:`~replay_bridge.sink.SampleSink` does to overlap compression with checking.
    """

    DEFAULT_BATCH_BYTES = 2 << 20

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        geometry: RoutingGeometry,
        *,
        samples_per_shard: int = 1024,
        compression: str | None = "zstd",
        compression_level: int | None = None,
        batch_bytes: int | None = None,
        resume: bool = False,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.dir = Path(out_dir)
        self.geometry = geometry
        self.samples_per_shard = int(samples_per_shard)
        self.batch_bytes = max(int(batch_bytes or self.DEFAULT_BATCH_BYTES), 1)
        self._codec = _codec(compression, compression_level)
        self._options = ipc.IpcWriteOptions(compression=self._codec)
        self._schema = schema_for(geometry)
        self._ids: set[str] = set()
        self._batch: list[RoutedSample] = []
        self._batch_bytes = 0
        self._open_rows = 0
        self._open_tokens = 0
        self._open_routed_rows = 0
        self._sink: HashingFile | None = None
        self._ipc: ipc.RecordBatchFileWriter | None = None
        self._records: list[dict[str, Any]] = []
        self._pending_tokens = 0
        self._closed = False
        comp = "none" if self._codec is None else self._codec.name
        if (self.dir / MANIFEST).exists():
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
            self._manifest.write(self.dir)

    # ---- resume --------------------------------------------------------------------------

    def _recover(self) -> None:
        """Drop temp files, adopt complete files renamed before the manifest caught up, and
        load the stored ids."""
        for p in self.dir.iterdir():
            if is_temp_name(p.name):
                p.unlink()
        m = self._manifest
        listed = m.files
        for p in sorted(self.dir.iterdir()):
            if p.name in listed or p.is_symlink():
                continue
            if SHARD_RE.fullmatch(p.name):
                scan = scan_shard(p, p.name, m.geometry)
                m.shards.append(ShardEntry(p.name, scan.rows, scan.tokens, scan.routed_rows,
                                           p.stat().st_size, sha256_file(p)))
                m.outcomes["stored"] += scan.rows
            elif QUARANTINE_RE.fullmatch(p.name):
                recs = list(read_chunk(p, p.name))
                m.quarantine.append(QuarantineEntry(p.name, len(recs), p.stat().st_size,
                                                    sha256_file(p)))
                for r in recs:
                    m.outcomes[outcome_of(r)] += 1
        for e in m.shards:
            path = self.dir / e.file
            if not path.is_file() or path.stat().st_size != e.bytes:
                raise ShardError(f"{e.file}: missing or not {e.bytes} bytes; run validate",
                                 file=e.file)
            ids = scan_shard(path, e.file, m.geometry, what="ids").ids
            dup = self._ids.intersection(ids)
            if dup:
                raise ShardError(f"{e.file}: sample ids stored twice: {sorted(dup)[:5]}",
                                 file=e.file)
            self._ids.update(ids)
        m.write(self.dir)

    # ---- public --------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def stored_ids(self) -> frozenset[str]:
        """Ids stored in sealed shards or pending in the open one."""
        return frozenset(self._ids)

    def __contains__(self, sample_id: object) -> bool:
        """Whether ``sample_id`` is stored: in a sealed shard (this run's or, resumed, an
        earlier run's) or pending in the open one."""
        return sample_id in self._ids

    @property
    def stats(self) -> ShardStats:
        m = self._manifest
        pending = Counter(map(outcome_of, self._records))
        return ShardStats(
            stored=m.samples + self._open_rows + len(self._batch),
            quarantined=m.outcomes["rejected"] + pending["rejected"],
            failed=m.outcomes["failed"] + pending["failed"],
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
        """Keep a rejected sample: its report and, when decodable, its tokens and routing."""
        self._check_open()
        self._records.append(rejection_record(report, sample, note))

    def record_failure(self, sample_id: str, error: BaseException | str,
                       kind: str = "request_failed") -> None:
        """Record a sample that never came back from the engine (outcome ``failed``)."""
        self._check_open()
        self._records.append(failure_record(sample_id, error, kind))

    def flush(self) -> None:
        """Seal the open shard and the pending quarantine records; rewrite the manifest."""
        self._check_open()
        if self._batch:
            self._write_batch()
        m = self._manifest
        changed = False
        if self._ipc is not None:
            entry = self._seal()
            m.shards.append(entry)
            m.outcomes["stored"] += entry.rows
            changed = True
        if self._records:
            name = quarantine_name(self._next_index(m.quarantine))
            data = encode_records(self._records)
            sha = atomic_write(self.dir / name, data)
            m.quarantine.append(QuarantineEntry(name, len(self._records), len(data), sha))
            for r in self._records:
                m.outcomes[outcome_of(r)] += 1
            self._records = []
            changed = True
        if changed:
            m.write(self.dir)

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
        batch = to_record_batch(self._batch, self.geometry, self._schema)
        if self._ipc is None:
            idx = self._next_index(self._manifest.shards)
            tmp = self.dir / (shard_name(idx) + TMP_SUFFIX)
            if tmp.exists():
                tmp.unlink()
            self._sink = HashingFile(tmp)
            self._ipc = ipc.new_file(self._sink, self._schema, options=self._options)
        self._ipc.write_batch(batch)
        self._open_rows += batch.num_rows
        self._open_tokens += self._pending_tokens
        self._open_routed_rows += sum(s.rows for s in self._batch)
        self._batch, self._batch_bytes, self._pending_tokens = [], 0, 0

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
        return entry

    def _abort_open(self) -> None:
        if self._sink is not None:
            self._sink.close()
        self._ipc = self._sink = None

    @staticmethod
    def _next_index(entries: list[Any]) -> int:
        if not entries:
            return 0
        return max(int(e.file.split("-")[1].split(".")[0]) for e in entries) + 1

