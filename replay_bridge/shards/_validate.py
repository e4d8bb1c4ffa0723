"""Re-check a dataset end to end: every writer's manifest and index, every listed object's
size and digest, geometry, counts, duplicate ids, every stored sample's routing, the
quarantine, and what lies in the dataset unlisted.

:func:`validate_dataset` raises :class:`~replay_bridge.shards.ShardError` only when the URI
cannot be read as a dataset at all (no manifest, or one that cannot be trusted); everything
else is collected as a :class:`Fault` naming the object.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..checks import CheckTally, check_routed
from ._checksum import Checksums, checksums_for
from ._dataset import DatasetView
from ._errors import ShardError
from ._manifest import Manifest, ShardEntry
from ._quarantine import OutcomeLedger, outcome_of, read_chunk
from ._reader import verify_object
from ._rules import batch_breaks
from ._schema import check_schema, samples_from_batch
from ._store import open_store
from ._strays import strays

__all__ = ["MAX_LISTED_SAMPLE_FAULTS", "Fault", "ValidationReport", "validate_dataset",
           "validate_dir"]

MAX_LISTED_SAMPLE_FAULTS = 50


@dataclass(frozen=True)
class Fault:
    """One problem found: the file it is in, a kind, and a message naming the rule broken."""

    file: str
    kind: str
    message: str
    sample_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"file": self.file, "kind": self.kind, "message": self.message}
        if self.sample_id is not None:
            d["sample_id"] = self.sample_id
        return d


@dataclass
class ValidationReport:
    directory: str
    """The dataset's URI, for display."""
    manifest: Manifest
    """The whole dataset as one manifest (writer ``*``)."""
    tally: CheckTally
    faults: list[Fault] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sample_faults: int = 0
    """Stored samples whose routing fails a check (only the first few are listed)."""
    shards_bad: int = 0
    samples: int = 0
    tokens: int = 0
    quarantine_records: int = 0
    quarantine_outcomes: dict[str, int] = field(default_factory=dict)
    writers: int = 0
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    """``(sample_id, shard read, shard ignored)``: ids two writers stored."""

    @property
    def ok(self) -> bool:
        return not self.faults and not self.sample_faults

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dir": self.directory,
            "writers": self.writers,
            "ok": self.ok,
            "exit_code": 0 if self.ok else 1,
            "geometry": m.geometry.to_dict(),
            "format_version": m.format_version,
            "compression": m.compression,
            "manifest": {**m.totals(), "outcomes": dict(m.outcomes)},
            "shards": {"listed": len(m.shards), "bad": self.shards_bad},
            "samples": self.samples,
            "tokens": self.tokens,
            "sample_faults": self.sample_faults,
            "faults": [f.to_dict() for f in self.faults],
            "warnings": list(self.warnings),
            "duplicates": [{"sample_id": s, "read": a, "ignored": b}
                           for s, a, b in self.duplicates],
            "check": self.tally.to_dict(),
            "quarantine": {
                "files": len(m.quarantine),
                "records": self.quarantine_records,
                "outcomes": dict(self.quarantine_outcomes),
            },
        }


def validate_dataset(uri: str | os.PathLike[str],
                     on_samples: Callable[[int], None] | None = None) -> ValidationReport:
    """Validate a dataset; ``on_samples(n)`` is called as samples are checked."""
    view = DatasetView.load(open_store(uri))  # ShardError: not a dataset
    merged = view.merged()
    report = ValidationReport(view.store.display, merged, CheckTally(merged.geometry),
                              writers=len(view.manifests), duplicates=list(view.duplicates))
    for sid, kept, ignored in view.duplicates:
        report.warnings.append(f"sample {sid!r} is stored by two writers ({kept} and "
                               f"{ignored}); readers read the copy in {kept} (the writer that "
                               "started first)")
    rows = _IndexRows(view)
    seen: dict[str, set[str]] = {}
    for obj, (m, pos) in enumerate(view.objects):
        if not _check_shard(report, view, m, m.shards[pos], rows.of(obj),
                            seen.setdefault(m.writer, set()), on_samples):
            report.shards_bad += 1
    _check_quarantine(report, view, rows)
    for warning in strays(view.store, view.manifests):
        report.warnings.append(warning)
    return report


validate_dir = validate_dataset
"""The same as :func:`validate_dataset` (a local directory is a dataset URI)."""


def _check_shard(report: ValidationReport, view: DatasetView, m: Manifest, entry: ShardEntry,
                 idx: dict[str, np.ndarray], seen: set[str],
                 on_samples: Callable[[int], None] | None) -> bool:
    store, g, name = view.store, report.manifest.geometry, entry.file
    faults = report.faults
    n_before = len(faults)
    try:
        verify_object(store, entry)
    except ShardError as e:
        faults.append(Fault(name, e.kind, str(e)))
        if e.kind in ("missing", "unsafe_path", "unreadable"):  # nothing more to read
            return False
    try:
        source = store.open(name)
        reader = ipc.open_file(source)
        check_schema(reader.schema, name, g, version=m.format_version)
    except ShardError as e:
        faults.append(Fault(name, e.kind, str(e)))
        return False
    except (OSError, pa.ArrowException) as e:
        faults.append(Fault(name, "unreadable", f"{name}: not a readable Arrow IPC file ({e})"))
        return False
    rows = tokens = routed_rows = 0
    per_row = g.ids_per_token
    checksums = checksums_for(m.format_version)
    try:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            batch.validate(full=True)
            _check_block(report, source, name, i, batch, idx, checksums)
            breaks = {b.row: b for b in batch_breaks(batch, g)}
            t_off = batch.column("tokens").offsets
            r_off = batch.column("routed").offsets
            rows += batch.num_rows
            tokens += t_off[-1].as_py() - t_off[0].as_py() if batch.num_rows else 0
            routed_rows += (r_off[-1].as_py() - r_off[0].as_py()) // per_row \
                if batch.num_rows else 0
            for sid in batch.column("sample_id").to_pylist():
                if sid is None:
                    continue
                if sid in seen:
                    faults.append(Fault(name, "duplicate_id", f"{name}: sample {sid!r} is stored "
                                        f"twice by writer {m.writer}", sid))
                seen.add(sid)
            for b in breaks.values():
                _sample_fault(report, Fault(name, "unreadable" if b.unreadable else
                                            "storage_rule", f"{name}: {b.message}",
                                            _id_or_none(b.sample_id)))
            if breaks:  # the rows that keep every storage rule, one by one
                samples = [samples_from_batch(batch.slice(r, 1), g, name)[0]
                           for r in range(batch.num_rows) if r not in breaks]
            else:
                samples = samples_from_batch(batch, g, name)
            for s in samples:
                check = check_routed(s, g)
                report.tally.add(check)
                if not check.ok:
                    _sample_fault(report, Fault(name, "routing", check.message, s.sample_id))
            if on_samples is not None:
                on_samples(batch.num_rows)
    except ShardError as e:
        faults.append(Fault(name, "unreadable", str(e)))
        return False
    except (OSError, pa.ArrowException, ValueError, KeyError) as e:
        faults.append(Fault(name, "unreadable", f"{name}: unreadable record batch ({e})"))
        return False
    finally:  # what was read counts, also when a later batch is unreadable
        report.samples += rows
        report.tokens += tokens
        source.close()
    for what, got, want in (("samples", rows, entry.rows), ("tokens", tokens, entry.tokens),
                            ("routed_rows", routed_rows, entry.routed_rows),
                            ("index rows", len(idx["row"]), entry.rows)):
        if got != want:
            faults.append(Fault(name, "counts",
                                f"{name}: holds {got} {what}, the manifest says {want}"))
    return len(faults) == n_before


class _IndexRows:
    """The index rows of each listed shard (before duplicates are resolved), grouped once."""

    COLUMNS = ("sample_id", "batch", "row", "offset", "length", "checksum")

    def __init__(self, view: DatasetView) -> None:
        self.index = view.index
        self.obj = view.index.column("object").to_numpy()
        self.order = np.argsort(self.obj, kind="stable")
        self.bounds = np.searchsorted(self.obj[self.order], np.arange(len(view.objects) + 1))

    def of(self, obj: int) -> dict[str, np.ndarray]:
        t = self.index.take(self.order[self.bounds[obj]:self.bounds[obj + 1]])
        return {c: t.column(c).to_numpy(zero_copy_only=False) for c in self.COLUMNS}

    def stored_ids(self, first: int, count: int) -> set[str]:
        """The ids stored in shards ``first`` to ``first + count`` (one writer's)."""
        t = self.index.take(self.order[self.bounds[first]:self.bounds[first + count]])
        return set(t.column("sample_id").to_pylist())


def _check_block(report: ValidationReport, source: pa.NativeFile, name: str, i: int,
                 batch: pa.RecordBatch, idx: dict[str, np.ndarray],
                 checksums: Checksums) -> None:
    """The index's rows for record batch ``i``: its ids in order, and a byte range whose
    checksum (the shard format's) matches and which decodes to this batch."""
    mine = idx["batch"] == i
    ids = batch.column("sample_id").to_pylist()
    if list(idx["sample_id"][mine]) != ids or list(idx["row"][mine]) != list(range(len(ids))):
        report.faults.append(Fault(name, "index", f"{name}: the index does not list record "
                                   f"batch {i}'s samples in order"))
        return
    if not mine.any():
        return
    j = int(np.flatnonzero(mine)[0])
    offset, length = int(idx["offset"][j]), int(idx["length"][j])
    if offset + length > source.size():
        report.faults.append(Fault(name, "index", f"{name}: the index's byte range for record "
                                   f"batch {i}, {offset}..{offset + length}, ends past the "
                                   f"object's {source.size()} bytes"))
        return
    buf = pa.py_buffer(source.read_at(length, offset))
    if buf.size != length or checksums.block(buf) != int(idx["checksum"][j]):
        report.faults.append(Fault(name, "checksum", f"{name}: record batch {i}'s bytes "
                                   f"{offset}..{offset + length} do not match the index's "
                                   f"{checksums.block_algorithm}"))
        return
    try:
        same = ipc.read_record_batch(ipc.read_message(buf), batch.schema).equals(batch)
    except (OSError, EOFError, pa.ArrowException):
        same = False
    if not same:
        report.faults.append(Fault(name, "index", f"{name}: the index's byte range for record "
                                   f"batch {i} does not decode to that batch"))


def _sample_fault(report: ValidationReport, fault: Fault) -> None:
    """Count a stored sample that breaks a storage rule or fails a routing check; list the
    first :data:`MAX_LISTED_SAMPLE_FAULTS`."""
    report.sample_faults += 1
    if report.sample_faults <= MAX_LISTED_SAMPLE_FAULTS:
        report.faults.append(fault)


def _id_or_none(sample_id: object) -> str | None:
    return sample_id if isinstance(sample_id, str) else None


def _check_quarantine(report: ValidationReport, view: DatasetView, rows: _IndexRows) -> None:
    """Every chunk's records; each writer's outcome counts (each sample id once: stored by
    it wins, else its latest record) against its manifest's."""
    first = 0  # a writer's shards are consecutive objects of the view
    for m in view.manifests:
        own = rows.stored_ids(first, len(m.shards))
        first += len(m.shards)
        ledger = OutcomeLedger()
        readable = True
        for entry in m.quarantine:
            try:
                n = 0
                for rec in read_chunk(view.store, entry.file, listed=entry):
                    n += 1
                    ledger.record(rec["sample_id"], outcome_of(rec),
                                  stored=rec["sample_id"] in own)
            except ShardError as e:
                report.faults.append(Fault(entry.file, f"quarantine_{e.kind}", str(e)))
                readable = False
                continue
            report.quarantine_records += n
            if n != entry.records:
                report.faults.append(Fault(entry.file, "counts", f"{entry.file}: holds {n} "
                                           f"records, the manifest says {entry.records}"))
        said = {k: m.outcomes[k] for k in ledger.counts}
        if readable and said != ledger.counts:
            report.faults.append(Fault(
                f"writer {m.writer}", "counts", f"writer {m.writer}'s manifest: outcomes say "
                f"{said}, its quarantine holds {ledger.counts} (each sample id once: stored "
                "wins, else its latest record)"))
    outcomes = report.manifest.outcomes  # the dataset's: each id once across writers
    report.quarantine_outcomes = {k: outcomes[k] for k in ("rejected", "failed")}
