"""Re-check a shard directory end to end: files, checksums, manifest counts, geometry,
duplicate ids, every stored sample's routing, and the quarantine.

:func:`validate_dir` raises :class:`~replay_bridge.shards.ShardError` only when the directory
cannot be read as a shard directory at all (no or unusable ``manifest.json``); everything
else is collected as a :class:`Fault` naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..checks import CheckTally, check_routed
from ._errors import ShardError
from ._manifest import MANIFEST, Manifest, is_member_name, is_temp_name
from ._quarantine import OutcomeLedger, outcome_of, read_chunk
from ._reader import verify_file
from ._rules import batch_breaks
from ._scan import open_ipc
from ._schema import samples_from_batch

__all__ = ["MAX_LISTED_SAMPLE_FAULTS", "Fault", "ValidationReport", "validate_dir"]

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
    directory: Path
    manifest: Manifest
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

    @property
    def ok(self) -> bool:
        return not self.faults and not self.sample_faults

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dir": str(self.directory),
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
            "check": self.tally.to_dict(),
            "quarantine": {
                "files": len(m.quarantine),
                "records": self.quarantine_records,
                "outcomes": dict(self.quarantine_outcomes),
            },
        }


def validate_dir(directory: str | os.PathLike[str],
                 on_samples: Callable[[int], None] | None = None) -> ValidationReport:
    """Validate a shard directory; ``on_samples(n)`` is called as samples are checked."""
    root = Path(directory)
    manifest = Manifest.read(root)  # ShardError: not a shard directory
    report = ValidationReport(root, manifest, CheckTally(manifest.geometry))
    seen: dict[str, str] = {}
    for entry in manifest.shards:
        if not _check_shard(report, entry, seen, on_samples):
            report.shards_bad += 1
    _check_quarantine(report, seen)
    _check_strays(report)
    return report


def _check_shard(report: ValidationReport, entry: Any, seen: dict[str, str],
                 on_samples: Callable[[int], None] | None) -> bool:
    root, g, name = report.directory, report.manifest.geometry, entry.file
    faults = report.faults
    n_before = len(faults)
    try:
        path = verify_file(root, entry)
    except ShardError as e:
        faults.append(Fault(name, e.kind, str(e)))
        if e.kind in ("missing", "unsafe_path", "unreadable"):  # nothing more to read
            return False
        path = root / name
    try:
        reader = open_ipc(path, name, g)
    except ShardError as e:
        faults.append(Fault(name, e.kind, str(e)))
        return False
    rows = tokens = routed_rows = 0
    per_row = g.ids_per_token
    try:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            batch.validate(full=True)
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
                    faults.append(Fault(name, "duplicate_id", f"{name}: sample {sid!r} is also "
                                        f"stored in {seen[sid]}", sid))
                else:
                    seen[sid] = name
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
    for what, got, want in (("samples", rows, entry.rows), ("tokens", tokens, entry.tokens),
                            ("routed_rows", routed_rows, entry.routed_rows)):
        if got != want:
            faults.append(Fault(name, "counts",
                                f"{name}: holds {got} {what}, the manifest says {want}"))
    return len(faults) == n_before


def _sample_fault(report: ValidationReport, fault: Fault) -> None:
    """Count a stored sample that breaks a storage rule or fails a routing check; list the
    first :data:`MAX_LISTED_SAMPLE_FAULTS`."""
    report.sample_faults += 1
    if report.sample_faults <= MAX_LISTED_SAMPLE_FAULTS:
        report.faults.append(fault)


def _id_or_none(sample_id: object) -> str | None:
    return sample_id if isinstance(sample_id, str) else None


def _check_quarantine(report: ValidationReport, stored: dict[str, str]) -> None:
    """Every chunk's records; the outcome counts, each sample id once (stored wins, else its
    latest record), against the manifest's."""
    ledger = OutcomeLedger()
    per_record = {"rejected": 0, "failed": 0}
    readable = True
    for entry in report.manifest.quarantine:
        try:
            path = verify_file(report.directory, entry)
            n = 0
            for rec in read_chunk(path, entry.file):
                n += 1
                outcome = outcome_of(rec)
                per_record[outcome] += 1
                ledger.record(rec["sample_id"], outcome, stored=rec["sample_id"] in stored)
        except ShardError as e:
            report.faults.append(Fault(entry.file, f"quarantine_{e.kind}", str(e)))
            readable = False
            continue
        report.quarantine_records += n
        if n != entry.records:
            report.faults.append(Fault(entry.file, "counts", f"{entry.file}: holds {n} records, "
                                       f"the manifest says {entry.records}"))
    report.quarantine_outcomes = dict(ledger.counts)
    said = {k: report.manifest.outcomes[k] for k in ledger.counts}
    if not readable or said == ledger.counts:
        return
    if said == per_record:  # an older writer counted records, not sample ids
        report.warnings.append(f"{MANIFEST}: outcomes count quarantine records ({said}), not "
                               f"sample ids ({ledger.counts}); a resumed writer recounts them")
    else:
        report.faults.append(Fault(MANIFEST, "counts", f"{MANIFEST}: outcomes say {said}, the "
                                   f"quarantine holds {ledger.counts} (each sample id once: "
                                   "stored wins, else its latest record)"))


def _check_strays(report: ValidationReport) -> None:
    """Files the manifest does not list: harmless leftovers of a killed writer."""
    m = report.manifest
    listed = m.files | {MANIFEST}
    for p in sorted(report.directory.iterdir()):
        if p.name in listed:
            continue
        if is_temp_name(p.name):
            report.warnings.append(f"{p.name}: temp file of an interrupted write (ignored; "
                                   "removed by a resumed writer)")
        elif is_member_name(p.name):
            report.warnings.append(f"{p.name}: complete file not yet in {MANIFEST} (ignored; "
                                   "adopted by a resumed writer)")
        elif re.fullmatch(r"[\w.-]+", p.name):
            report.warnings.append(f"{p.name}: not part of the shard format (ignored)")
