"""Names of a dataset's objects and the per-writer manifest that publishes them.

A dataset is the union of its writers' manifests (``_routing_replay/manifests/<writer>.json``).
Each manifest lists the complete objects its writer published: shards at the top level
(``part-<writer>-<seq>.arrow``), quarantine chunks and one compact index. A manifest is
untrusted input when read: every field is type-checked, every name must be one of the format's
names for that writer, and the totals must add up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from ..geometry import GeometryError, RoutingGeometry
from ._checksum import checksums_for
from ._errors import ShardError
from ._schema import FORMAT_VERSION, READ_VERSIONS

__all__ = [
    "FOLDER",
    "INDEX_DIR",
    "MANIFEST_DIR",
    "QUARANTINE_DIR",
    "IndexEntry",
    "Manifest",
    "QuarantineEntry",
    "ShardEntry",
    "check_listed",
    "index_name",
    "manifest_name",
    "quarantine_name",
    "shard_name",
    "writer_of",
]

FORMAT = "routing-replay-dataset"
FOLDER = "_routing_replay"
MANIFEST_DIR = f"{FOLDER}/manifests"
INDEX_DIR = f"{FOLDER}/index"
QUARANTINE_DIR = f"{FOLDER}/quarantine"
WRITER = r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}"
WRITER_RE = re.compile(WRITER)
SHARD_RE = re.compile(rf"part-(?P<writer>{WRITER})-(?P<seq>[0-9]{{6,9}})\.arrow")
QUARANTINE_RE = re.compile(rf"{QUARANTINE_DIR}/(?P<writer>{WRITER})-(?P<seq>[0-9]{{6,9}})\.jsonl")
INDEX_RE = re.compile(rf"{INDEX_DIR}/(?P<writer>{WRITER})-(?P<seq>[0-9]{{6,9}})\.arrow")
MANIFEST_RE = re.compile(rf"{MANIFEST_DIR}/(?P<writer>{WRITER})\.json")
OUTCOMES = ("stored", "rejected", "failed")
MAX_MANIFEST_BYTES = 256 << 20


def shard_name(writer: str, seq: int) -> str:
    return f"part-{writer}-{seq:06d}.arrow"


def quarantine_name(writer: str, seq: int) -> str:
    return f"{QUARANTINE_DIR}/{writer}-{seq:06d}.jsonl"


def index_name(writer: str, gen: int) -> str:
    return f"{INDEX_DIR}/{writer}-{gen:06d}.arrow"


def manifest_name(writer: str) -> str:
    return f"{MANIFEST_DIR}/{writer}.json"


def writer_of(name: str) -> str | None:
    """The writer an object name belongs to, or None when it is not one of the format's."""
    for pattern in (SHARD_RE, QUARANTINE_RE, INDEX_RE, MANIFEST_RE):
        m = pattern.fullmatch(name)
        if m:
            return m.group("writer")
    return None


def check_listed(entry: ShardEntry | QuarantineEntry | IndexEntry, size: int,
                 digest: str | None = None) -> None:
    """An object's size (and digest under the entry's algorithm, when given) against its
    manifest entry."""
    if size != entry.bytes:
        what = "truncated" if size < entry.bytes else "longer than listed"
        raise ShardError(f"{entry.file}: {size} bytes, the manifest says {entry.bytes} "
                         f"({what})", file=entry.file, kind="size")
    if digest is not None and digest != entry.digest:
        raise ShardError(f"{entry.file}: {entry.algorithm} {digest[:16]}... does not match the "
                         f"manifest ({entry.digest[:16]}...): the object is corrupted",
                         file=entry.file, kind="checksum")


_CURRENT = checksums_for(FORMAT_VERSION).object_algorithm


def _entry_dict(entry: ShardEntry | QuarantineEntry | IndexEntry) -> dict[str, Any]:
    """A manifest entry as written: the digest under its algorithm's name."""
    doc = {k: v for k, v in vars(entry).items() if k not in ("digest", "algorithm")}
    doc[entry.algorithm] = entry.digest
    return doc


@dataclass
class ShardEntry:
    file: str
    rows: int
    """Samples (Arrow rows)."""
    tokens: int
    routed_rows: int
    bytes: int
    digest: str
    """Hex digest of the whole object under :attr:`algorithm`."""
    algorithm: str = _CURRENT
    """The digest's algorithm (its key in the manifest entry): ``xxh3_128`` from format 4,
    ``sha256`` before."""


@dataclass
class QuarantineEntry:
    file: str
    records: int
    bytes: int
    digest: str
    algorithm: str = _CURRENT


@dataclass
class IndexEntry:
    file: str
    rows: int
    bytes: int
    digest: str
    algorithm: str = _CURRENT


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Manifest:
    """What one writer published. ``outcomes`` counts the sample ids this writer stored,
    rejected (quarantined) and failed (never came back), each once: stored when in one of its
    shards, else the outcome of its latest quarantine record. ``format_version`` is the shard
    format of every shard it lists (a writer writes :data:`FORMAT_VERSION`; a dataset
    appended to keeps its older writers' manifests and shards as they are)."""

    geometry: RoutingGeometry
    writer: str = "-"
    compression: str = "zstd"
    shards: list[ShardEntry] = field(default_factory=list)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    index: IndexEntry | None = None
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    format_version: int = FORMAT_VERSION
    started: str = field(default_factory=_now)

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
        """Every object listed: shards, quarantine chunks, the index."""
        out = {s.file for s in self.shards} | {q.file for q in self.quarantine}
        if self.index is not None:
            out.add(self.index.file)
        return out

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
            "writer": self.writer,
            "started": self.started,
            "updated": _now(),
            "geometry": self.geometry.to_dict(),
            "compression": self.compression,
            "shards": [_entry_dict(s) for s in self.shards],
            "quarantine": [_entry_dict(q) for q in self.quarantine],
            "index": _entry_dict(self.index) if self.index is not None else None,
            "totals": self.totals(),
            "outcomes": dict(self.outcomes),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    # ---- read ----------------------------------------------------------------------------

    @classmethod
    def read(cls, uri: Any) -> Manifest:
        """The whole dataset at ``uri`` as one manifest (writer ``*``): every writer's shards
        and quarantine chunks, outcomes counting each sample id once."""
        from ._dataset import DatasetView
        from ._store import open_store

        return DatasetView.load(open_store(uri)).merged()

    # ---- parse ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, name: str) -> Manifest:
        """Read and check one writer's manifest (``name``: its object name)."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise _bad(name, f"not valid JSON: {e}") from None
        return cls.from_dict(doc, name)

    @classmethod
    def from_dict(cls, doc: Any, name: str) -> Manifest:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _bad(name, f"not a {FORMAT} manifest")
        version = doc.get("format_version")
        if type(version) is not int or version not in READ_VERSIONS:  # true == 1 == 1.0
            raise _bad(name, f"unsupported format_version {version!r} (this reader knows "
                             f"{', '.join(map(str, READ_VERSIONS))})")
        m = MANIFEST_RE.fullmatch(name)
        writer = doc.get("writer")
        if m is None or writer != m.group("writer"):
            raise _bad(name, f"writer {writer!r:.80} does not match its name")
        try:
            geometry = RoutingGeometry.from_dict(_get(name, doc, "geometry", dict))
        except (GeometryError, ValueError, TypeError) as e:
            raise _bad(name, f"bad geometry: {e}") from None
        shards = [ShardEntry(file=_member(name, writer, e, SHARD_RE), rows=_count(name, e, "rows"),
                             tokens=_count(name, e, "tokens"),
                             routed_rows=_count(name, e, "routed_rows"),
                             bytes=_count(name, e, "bytes"), **_digest(name, e, version))
                  for e in _get(name, doc, "shards", list)]
        quarantine = [QuarantineEntry(file=_member(name, writer, e, QUARANTINE_RE),
                                      records=_count(name, e, "records"),
                                      bytes=_count(name, e, "bytes"), **_digest(name, e, version))
                      for e in _get(name, doc, "quarantine", list)]
        raw_index = doc.get("index")
        index = None
        if raw_index is not None:
            index = IndexEntry(file=_member(name, writer, raw_index, INDEX_RE),
                               rows=_count(name, raw_index, "rows"),
                               bytes=_count(name, raw_index, "bytes"),
                               **_digest(name, raw_index, version))
        elif shards or quarantine:
            raise _bad(name, "lists objects but no index")
        outcomes = _get(name, doc, "outcomes", dict)
        started = doc.get("started")
        man = cls(geometry=geometry, writer=writer, compression=str(doc.get("compression", "")),
                  shards=shards, quarantine=quarantine, index=index,
                  outcomes={k: _count(name, outcomes, k) for k in OUTCOMES},
                  format_version=version, started=started if isinstance(started, str) else "")
        for group in (shards, quarantine):
            names = [e.file for e in group]
            if len(set(names)) != len(names):
                raise _bad(name, "lists an object twice")
        totals = _get(name, doc, "totals", dict)
        for key, value in man.totals().items():
            if _count(name, totals, key) != value:
                raise _bad(name, f"totals.{key} is {totals[key]} but the listed objects add up "
                                 f"to {value}")
        if man.outcomes["stored"] != man.samples:
            raise _bad(name, f"outcomes.stored is {man.outcomes['stored']} but the shards hold "
                             f"{man.samples} samples")
        if man.outcomes["rejected"] + man.outcomes["failed"] > man.quarantined:
            raise _bad(name, f"outcomes rejected {man.outcomes['rejected']} + failed "
                             f"{man.outcomes['failed']} > {man.quarantined} quarantine records")
        if index is not None and index.rows < man.samples:
            raise _bad(name, f"the index has {index.rows} rows for {man.samples} samples")
        return man


def _bad(name: str, message: str) -> ShardError:
    return ShardError(f"{name}: {message}", file=name, kind="manifest")


def _get(name: str, doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise _bad(name, f"{key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _count(name: str, entry: Any, key: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(name, f"{key!r} must be a non-negative integer in {entry!r:.120}")
    return value


def _digest(name: str, entry: dict[str, Any], version: int) -> dict[str, str]:
    """An entry's digest under its format's algorithm, as entry fields."""
    checksums = checksums_for(version)
    algo = checksums.object_algorithm
    value = entry.get(algo)
    if not checksums.is_digest(value):
        raise _bad(name, f"bad {algo} {value!r:.80} for {entry.get('file')!r:.80}")
    return {"digest": value, "algorithm": algo}


def _member(name: str, writer: str, entry: Any, pattern: re.Pattern[str]) -> str:
    """A listed object's name: one of the format's names, of this manifest's writer."""
    if not isinstance(entry, dict):
        raise ShardError(f"{name}: entry {entry!r:.80} is not an object", file=name,
                         kind="manifest")
    file = entry.get("file")
    m = pattern.fullmatch(file) if isinstance(file, str) else None
    if m is None or m.group("writer") != writer:
        raise ShardError(f"{name} names {file!r:.120}, which is not a {pattern.pattern!r} "
                         f"object of writer {writer!r}", file=name, kind="unsafe_path")
    return file
