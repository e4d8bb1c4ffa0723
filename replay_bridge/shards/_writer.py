"""Append checked samples to a dataset, crash-safely, beside any number of other writers."""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..checks import CheckReport
from ..geometry import RoutingGeometry
from ..sample import RoutedSample, WireSample, with_routing
from ._dataset import LEGACY_MANIFEST, DatasetView, has_dataset
from ._errors import DuplicateSample, ShardError
from ._index import OUTCOME_CODES, index_bytes, quarantine_rows, stored_rows
from ._manifest import (INDEX_DIR, MANIFEST_DIR, QUARANTINE_DIR, WRITER_RE, IndexEntry,
                        Manifest, QuarantineEntry, ShardEntry, index_name, manifest_name,
                        quarantine_name, shard_name)
from ._quarantine import ChunkWriter, OutcomeLedger, failure_record, outcome_of, rejection_record
from ._rules import conform
from ._schema import schema_for, to_record_batch
from ._store import ObjectWriter, open_store

__all__ = ["COMPRESSIONS", "ShardStats", "ShardWriter", "new_writer_id"]

COMPRESSIONS = ("zstd", "lz4", "none")
_CODE_OUTCOME = {v: k for k, v in OUTCOME_CODES.items()}


def new_writer_id() -> str:
    """A writer id unique across processes and machines: host, process, random suffix."""
    host = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname()).strip("-")[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


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
    """Write :class:`RoutedSample` s into a dataset (a local path or any ``pyarrow.fs`` URI)
    as Arrow IPC shards, published by this writer's own manifest and index.

    Every writer has its own id (``writer_id``, a fresh one by default), object names and
    manifest, so any number of writers append to one dataset at once with no lock. Samples go
    to this writer's open shard ``part-<writer>-<seq>.arrow`` in record batches of about
    ``batch_bytes`` of routing; a shard is sealed (footer; a local file is fsynced and renamed,
    an object's upload completes) every ``samples_per_shard`` samples, on :meth:`flush` and on
    :meth:`close`, then published: a new index, then the manifest that lists both. ``batch_bytes`` trades compressed random lookups (one record batch is decompressed
    per lookup) against per-batch overhead. A writer killed at any instant leaves only complete
    shards; samples of the open shard are not stored (``stored_ids`` of a resumed writer says
    which are).

    Quarantine records are written to the open chunk (``_routing_replay/quarantine/``) as they
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
        uri: str | os.PathLike[str],
        geometry: RoutingGeometry,
        *,
        samples_per_shard: int = 1024,
        compression: str | None = "zstd",
        compression_level: int | None = None,
        batch_bytes: int | None = None,
        quarantine_bytes: int | None = None,
        quarantine_records: int | None = None,
        resume: bool = False,
        writer_id: str | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if writer_id is not None and not WRITER_RE.fullmatch(str(writer_id)):
            raise ValueError(f"writer_id must match {WRITER_RE.pattern}, got {writer_id!r}")
        self.store = open_store(uri)
        self.uri = self.store.display
        self.writer_id = writer_id or new_writer_id()
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
        self._open_index: list[pa.Table] = []
        """Index rows of the open shard's record batches."""
        self._batch_no = 0
        self._batch: list[RoutedSample] = []
        self._batch_bytes = 0
        self._open_rows = 0
        self._open_tokens = 0
        self._open_routed_rows = 0
        self._sink: ObjectWriter | None = None
        self._ipc: ipc.RecordBatchFileWriter | None = None
        self._chunk: ChunkWriter | None = None
        self._last: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Outcome and kinds of each quarantined id's latest record (listed or open chunk)."""
        self._ledger = OutcomeLedger()
        self._pending_tokens = 0
        self._closed = False
        self._index_parts: list[Any] = []
        """Index rows of this writer's sealed shards (pyarrow tables)."""
        self._quarantined: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Latest (outcome, kinds) of each id in this writer's sealed quarantine chunks."""
        self._index_gen = -1
        self._joined_nonempty = False
        """Whether a published manifest listed objects when this writer joined."""
        self._shard_seq = self._chunk_seq = 0
        self._block_start = 0
        self._header = 8 + self._schema.serialize().size
        """Bytes before an IPC file's first record batch: magic and schema message."""
        comp = "none" if self._codec is None else self._codec.name
        store = self.store
        if has_dataset(store):
            if store.info(LEGACY_MANIFEST) is not None:
                raise ShardError(f"{self.uri} is a format-1 shard directory "
                                 f"({LEGACY_MANIFEST}); write to a new dataset",
                                 kind="manifest")
            if not resume:
                raise ShardError(f"{self.uri} already holds a dataset; pass resume=True to "
                                 "append to it")
            self._load_earlier(geometry)
        if store.info(manifest_name(self.writer_id)) is not None:
            raise ShardError(f"{self.uri}: writer id {self.writer_id!r} is taken; every "
                             "writer needs its own")
        store.make_dirs(MANIFEST_DIR, INDEX_DIR, QUARANTINE_DIR)
        self._manifest = Manifest(geometry=geometry, writer=self.writer_id, compression=comp)
        self._write_manifest()

    # ---- resume --------------------------------------------------------------------------

    def _load_earlier(self, geometry: RoutingGeometry) -> None:
        """The ids every published writer stored, and each quarantined id's latest record
        (from their indexes: no shard or quarantine chunk is read)."""
        view = DatasetView.load(self.store)
        view.geometry.require_same(geometry, "dataset geometry and writer")
        self._joined_nonempty = any(m.shards or m.quarantine for m in view.manifests)
        self._earlier.update(view.stored.column("sample_id").to_pylist())
        q = view.index.filter(pa.compute.not_equal(view.index.column("outcome"), 0))
        for sid, code, kinds in zip(q.column("sample_id").to_pylist(),
                                    q.column("outcome").to_pylist(),
                                    q.column("kinds").to_pylist()):
            self._last[sid] = (_CODE_OUTCOME[code], tuple(kinds.split(",")) if kinds else ())

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
            self._withdraw_if_idle()
        finally:
            self._closed = True
            self._abort_open()

    def _withdraw_if_idle(self) -> None:
        """A writer that published nothing into a dataset that already held data removes its
        (empty) manifest, so idle resumes do not pile up manifests every reader must fetch.
        The dataset stays a dataset: a manifest that lists objects is never removed."""
        m = self._manifest
        if self._joined_nonempty and not m.shards and not m.quarantine:
            try:
                self.store.delete(manifest_name(self.writer_id))
            except (OSError, ShardError):
                pass  # an empty manifest left behind is harmless

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
            raise ValueError(f"shard writer for {self.uri} is closed")

    def _conform(self, s: RoutedSample) -> np.ndarray:
        """The routing as it will be stored; :class:`DuplicateSample`, or
        :class:`UnstorableSample` naming the storage rule broken (``_rules.py``: the rules
        the reader and ``validate`` check again)."""
        if not isinstance(s, RoutedSample):
            raise TypeError(f"ShardWriter.add takes a RoutedSample, got {type(s).__name__}")
        sid = s.sample_id
        if isinstance(sid, str) and sid in self:
            raise DuplicateSample(f"sample {sid!r} is already stored in {self.uri}",
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
            self._sink = self.store.create(shard_name(self.writer_id, self._shard_seq))
            self._ipc = ipc.new_file(self._sink, self._schema, options=self._options)
            self._batch_no = 0
        # The first batch's bytes follow the file's magic and schema, written with it.
        self._sink.begin_block(self._header if self._batch_no == 0 else None)
        self._ipc.write_batch(batch)
        self._open_index.append(stored_rows(batch, len(self._manifest.shards), self._batch_no,
                                            self._sink.end_block()))
        self._batch_no += 1
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
        self._sink.commit()
        entry = ShardEntry(self._sink.name, self._open_rows, self._open_tokens,
                           self._open_routed_rows, self._sink.size, self._sink.hexdigest)
        self._shard_seq += 1
        self._index_parts.extend(self._open_index)
        self._open_index = []
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
            name = quarantine_name(self.writer_id, self._chunk_seq)
            self._chunk_seq += 1
            self._chunk = ChunkWriter(self.store, name)
        self._chunk.write(record)
        self._last[sid] = key
        if (self._chunk.bytes >= self.quarantine_bytes
                or len(self._chunk.entries) >= self.quarantine_records):
            self._seal_chunk()
            self._write_manifest()

    def _seal_chunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None
        records, size, digest = chunk.seal()
        self._manifest.quarantine.append(QuarantineEntry(chunk.name, records, size, digest))
        for sid, outcome, kinds in chunk.entries:
            self._ledger.record(sid, outcome, stored=self._sealed(sid))
            self._quarantined[sid] = (outcome, kinds)

    def _write_manifest(self) -> None:
        """Publish: this writer's index (a new object), then its manifest naming it; the
        index it replaces is removed afterwards."""
        m, store = self._manifest, self.store
        m.outcomes = {"stored": m.samples, **self._ledger.counts}
        parts = list(self._index_parts)
        if self._quarantined:
            stored_here = self._ids - self._unsealed
            latest = [(sid, o, k) for sid, (o, k) in self._quarantined.items()
                      if sid not in stored_here]
            if latest:
                parts.append(quarantine_rows(latest))
        previous = m.index
        if parts or previous is not None:
            table = pa.concat_tables(parts) if parts else quarantine_rows([])
            data = index_bytes(table)
            self._index_gen += 1
            name = index_name(self.writer_id, self._index_gen)
            obj = store.create(name)
            obj.write(data)
            obj.commit()
            m.index = IndexEntry(name, table.num_rows, len(data), obj.hexdigest)
        store.put(manifest_name(self.writer_id), m.to_json())
        if previous is not None and previous.file != (m.index.file if m.index else None):
            try:
                store.delete(previous.file)
            except (OSError, ShardError):
                pass  # a leftover index generation: cleanup removes it

    def _abort_open(self) -> None:
        if self._sink is not None:
            self._sink.abort()
        if self._chunk is not None:
            self._chunk.abort()
        self._ipc = self._sink = self._chunk = None


