"""``manifest.json``: the list of complete shards and quarantine chunks of a directory.

The manifest is untrusted input when read: every field is type-checked, every file name must
be a plain ``shard-NNNNNN.arrow`` / ``quarantine-NNNNNN.jsonl`` inside the directory, and the
totals must add up.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..geometry import GeometryError, RoutingGeometry
from ._atomic import TMP_SUFFIX, atomic_write
from ._errors import ShardError
from ._schema import FORMAT_VERSION

__all__ = [
    "MANIFEST",
    "Manifest",
    "QuarantineEntry",
    "ShardEntry",
    "is_member_name",
    "is_temp_name",
    "member_path",
    "quarantine_name",
    "shard_name",
]

MANIFEST = "manifest.json"
FORMAT = "routing-replay-shards"
SHARD_RE = re.compile(r"shard-([0-9]{6,9})\.arrow")
QUARANTINE_RE = re.compile(r"quarantine-([0-9]{6,9})\.jsonl")
OUTCOMES = ("stored", "rejected", "failed")
_MAX_MANIFEST_BYTES = 256 << 20


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.arrow"


def quarantine_name(index: int) -> str:
    return f"quarantine-{index:06d}.jsonl"


def is_member_name(name: str) -> bool:
    """Whether ``name`` is a shard or quarantine file name."""
    return bool(SHARD_RE.fullmatch(name) or QUARANTINE_RE.fullmatch(name))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is the temp file of an interrupted write of a member or the manifest."""
    if not name.endswith(TMP_SUFFIX):
        return False
    base = name[: -len(TMP_SUFFIX)]
    return is_member_name(base) or base == MANIFEST


def member_path(directory: Path, name: object, pattern: re.Pattern[str]) -> Path:
    """The path of a file the manifest names, refusing anything that could leave the
    directory: other names, separators, ``..``, absolute paths, symlinks."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ShardError(
            f"{MANIFEST} names {name!r}, which is not a {pattern.pattern!r} file inside the "
            "shard directory", file=MANIFEST, kind="unsafe_path")
    path = directory / name
    if path.is_symlink():
        raise ShardError(f"{name} is a symlink; shard files must be regular files", file=name,
                         kind="unsafe_path")
    root = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(path)) != root:
        raise ShardError(f"{name} resolves outside the shard directory", file=name,
                         kind="unsafe_path")
    return path


@dataclass
class ShardEntry:
    file: str
    rows: int
    """Samples (Arrow rows)."""
    tokens: int
    routed_rows: int
    bytes: int
    sha256: str


@dataclass
class QuarantineEntry:
    file: str
    records: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a shard directory holds. ``outcomes`` counts sample ids stored, rejected
    (quarantined) and failed (never came back), each id once: stored when it is in a shard,
    else the outcome of its latest quarantine record."""

    geometry: RoutingGeometry
    compression: str = "zstd"
    shards: list[ShardEntry] = field(default_factory=list)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    format_version: int = FORMAT_VERSION

    # ---- derived -------------------------------------------------------------------------

    @property
    def samples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def routed_rows(self) -> int:
        return sum(s.routed_rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def quarantined(self) -> int:
        return sum(q.records for q in self.quarantine)

    @property
    def files(self) -> set[str]:
        """The shard and quarantine files listed."""
        return {s.file for s in self.shards} | {q.file for q in self.quarantine}

    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "samples": self.samples,
            "tokens": self.tokens,
            "routed_rows": self.routed_rows,
            "bytes": self.bytes,
            "quarantined": self.quarantined,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "geometry": self.geometry.to_dict(),
            "compression": self.compression,
            "shards": [vars(s) for s in self.shards],
            "quarantine": [vars(q) for q in self.quarantine],
            "totals": self.totals(),
            "outcomes": dict(self.outcomes),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    # ---- io ------------------------------------------------------------------------------

    def write(self, directory: Path) -> None:
        """Rewrite ``manifest.json`` atomically."""
        atomic_write(directory / MANIFEST, orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and check ``manifest.json``; :class:`ShardError` on anything off."""
        path = directory / MANIFEST
        if not directory.is_dir():
            raise ShardError(f"{directory} is not a directory")
        if not path.is_file() or path.is_symlink():
            raise _bad(f"{directory} is not a shard directory: no {MANIFEST}")
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise _bad(f"{MANIFEST} is implausibly large")
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as e:
            raise _bad(f"{MANIFEST} is not valid JSON: {e}") from None
        return cls.from_dict(doc, directory)

    @classmethod
    def from_dict(cls, doc: Any, directory: Path) -> Manifest:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _bad(f"{MANIFEST} is not a {FORMAT} manifest")
        version = doc.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # true == 1 == 1.0
            raise _bad(f"{MANIFEST}: unsupported format_version {version!r} "
                             f"(this reader knows {FORMAT_VERSION})")
        try:
            geometry = RoutingGeometry.from_dict(_get(doc, "geometry", dict))
        except (GeometryError, ValueError, TypeError) as e:
            raise _bad(f"{MANIFEST}: bad geometry: {e}") from None
        shards = [
            ShardEntry(
                file=_name(directory, e, SHARD_RE),
                rows=_count(e, "rows"), tokens=_count(e, "tokens"),
                routed_rows=_count(e, "routed_rows"), bytes=_count(e, "bytes"),
                sha256=_sha(e),
            )
            for e in _get(doc, "shards", list)
        ]
        quarantine = [
            QuarantineEntry(file=_name(directory, e, QUARANTINE_RE), records=_count(e, "records"),
                            bytes=_count(e, "bytes"), sha256=_sha(e))
            for e in _get(doc, "quarantine", list)
        ]
        outcomes = _get(doc, "outcomes", dict)
        m = cls(
            geometry=geometry,
            compression=str(doc.get("compression", "")),
            shards=shards,
            quarantine=quarantine,
            outcomes={k: _count(outcomes, k) for k in OUTCOMES},
        )
        for group in (shards, quarantine):
            names = [e.file for e in group]
            if len(set(names)) != len(names):
                raise _bad(f"{MANIFEST} lists a file twice")
        totals = _get(doc, "totals", dict)
        for key, value in m.totals().items():
            if _count(totals, key) != value:
                raise _bad(
                    f"{MANIFEST}: totals.{key} is {totals[key]} but the listed files add up to "
                    f"{value}")
        if m.outcomes["stored"] != m.samples:
            raise _bad(f"{MANIFEST}: outcomes.stored is {m.outcomes['stored']} but the "
                             f"shards hold {m.samples} samples")
        if m.outcomes["rejected"] + m.outcomes["failed"] > m.quarantined:
            # Each quarantined id counts once, under its latest outcome, and not at all once
            # stored: the counts never exceed the records.
            raise _bad(
                f"{MANIFEST}: outcomes rejected {m.outcomes['rejected']} + failed "
                f"{m.outcomes['failed']} > {m.quarantined} quarantine records")
        return m


def _bad(message: str) -> ShardError:
    return ShardError(message, file=MANIFEST, kind="manifest")


def _get(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise _bad(f"{MANIFEST}: {key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _count(entry: Any, key: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"{MANIFEST}: {key!r} must be a non-negative integer in {entry!r:.120}")
    return value


def _sha(entry: dict[str, Any]) -> str:
    value = entry.get("sha256")
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise _bad(f"{MANIFEST}: bad sha256 {value!r:.80} for {entry.get('file')!r:.80}")
    return value


def _name(directory: Path, entry: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(entry, dict):
        raise _bad(f"{MANIFEST}: file entry {entry!r:.80} is not an object")
    name = entry.get("file")
    member_path(directory, name, pattern)
    return name
