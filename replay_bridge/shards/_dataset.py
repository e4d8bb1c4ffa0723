"""A dataset as its readers and writers see it: every published manifest and the union of
their indexes, with the one rule for an id that two writers stored."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from ..geometry import GeometryMismatch
from ._checksum import object_digest
from ._errors import ShardError
from ._index import LOADED_SCHEMA, OUTCOME_CODES, parse_index
from ._manifest import FOLDER, MANIFEST_DIR, MANIFEST_RE, MAX_MANIFEST_BYTES, Manifest
from ._store import Store

__all__ = ["DatasetView", "LEGACY_MANIFEST", "has_dataset", "is_dataset"]

LEGACY_MANIFEST = "manifest.json"
_INDEX_RETRIES = 3
_MANIFEST_RETRIES = 5


def has_dataset(store: Store) -> bool:
    """Whether any writer has published a manifest here (or a format-1 manifest is here)."""
    if any(MANIFEST_RE.fullmatch(o.name) for o in store.list(MANIFEST_DIR)):
        return True
    return store.info(LEGACY_MANIFEST) is not None


def is_dataset(uri: object) -> bool:
    """Whether ``uri`` holds a dataset (a published manifest), of this format or format 1."""
    from ._store import open_store

    return has_dataset(open_store(uri))


@dataclass
class DatasetView:
    """Every writer's manifest (ordered by start time, then writer id) and their indexes.

    ``index`` has the index columns plus ``object`` (position in :attr:`objects`); ``stored``
    is its stored rows with each sample id once: **when two writers stored the same id, the
    copy of the writer that started first is read** and the others are listed in
    :attr:`duplicates`.
    """

    store: Store
    manifests: list[Manifest]
    index: pa.Table
    stored: pa.Table
    objects: list[tuple[Manifest, int]]
    """``(manifest, shard position)`` of every listed shard, in storage order."""
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    """``(sample_id, object read, object ignored)`` for ids stored by more than one writer."""

    @property
    def geometry(self):  # noqa: ANN201
        return self.manifests[0].geometry

    def shard_file(self, obj: int) -> str:
        m, i = self.objects[obj]
        return m.shards[i].file

    @classmethod
    def load(cls, store: Store, snapshot: dict[str, Iterable[str]] | None = None) -> DatasetView:
        """Read every manifest and index. ``snapshot`` (writer -> shard names) keeps only those
        shards: what a reader pickled in another process saw."""
        names = [o.name for o in store.list(MANIFEST_DIR) if MANIFEST_RE.fullmatch(o.name)]
        if not names:
            if store.info(LEGACY_MANIFEST) is not None:
                raise ShardError(f"{store.display} is a format-1 shard directory "
                                 f"({LEGACY_MANIFEST}); this release reads formats 2 to 4 "
                                 f"(manifests under {FOLDER}/): re-ingest it",
                                 kind="manifest")
            what = "does not exist" if not store.exists() else "holds no published manifest"
            raise ShardError(f"{store.display} is not a routing-replay dataset: it {what}",
                             kind="manifest")
        loaded = []
        for name in names:
            man, table = _load_writer(store, name)
            if snapshot is not None:
                if man.writer not in snapshot:
                    continue
                keep = set(snapshot[man.writer])
                missing = keep - {s.file for s in man.shards}
                if missing:
                    raise ShardError(f"{name}: no longer lists {sorted(missing)[:3]}",
                                     file=name, kind="missing")
                pos = [i for i, s in enumerate(man.shards) if s.file in keep]
                table = _only_shards(table, pos)
                man = replace(man, shards=[man.shards[i] for i in pos])
            loaded.append((man, table))
        if not loaded:
            raise ShardError(f"{store.display}: none of the snapshot's writers is published",
                             kind="manifest")
        loaded.sort(key=lambda mt: (mt[0].started, mt[0].writer))
        first = loaded[0][0]
        for man, _ in loaded[1:]:
            try:
                first.geometry.require_same(man.geometry, f"writer {man.writer} and writer "
                                                          f"{first.writer}")
            except GeometryMismatch as e:
                raise ShardError(f"{store.display}: {e}", kind="geometry") from None
        objects: list[tuple[Manifest, int]] = []
        tables = []
        for man, table in loaded:
            base = len(objects)
            objects.extend((man, i) for i in range(len(man.shards)))
            shard = table.column("shard").to_numpy()
            obj = np.where(shard >= 0, shard + base, -1).astype(np.int32)
            tables.append(table.append_column("object", pa.array(obj)))
        index = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        quarantined = index.column("outcome").to_numpy() != 0
        stored = index.filter(pa.array(~quarantined)) if quarantined.any() else index
        view = cls(store, [m for m, _ in loaded], index, stored, objects)
        view._drop_duplicates()
        return view

    def _drop_duplicates(self) -> None:
        ids = self.stored.column("sample_id")
        if len(pc.unique(ids)) == len(ids):
            return
        codes = ids.dictionary_encode().combine_chunks().indices.to_numpy()
        _, first = np.unique(codes, return_index=True)
        keep = np.zeros(len(codes), bool)
        keep[first] = True
        obj = self.stored.column("object").to_numpy()
        first_of = dict(zip(codes[first].tolist(), first.tolist()))
        for i in np.flatnonzero(~keep).tolist():
            j = first_of[int(codes[i])]
            self.duplicates.append((ids[i].as_py(), self.shard_file(int(obj[j])),
                                    self.shard_file(int(obj[i]))))
        self.stored = self.stored.filter(pa.array(keep))

    def outcomes(self) -> dict[str, int]:
        """Sample ids stored, rejected and failed in the whole dataset, each id once: stored
        if any writer stored it, else the outcome of its latest quarantine record (writers in
        start order)."""
        q = self.index.filter(pc.not_equal(self.index.column("outcome"), 0))
        q = q.filter(pc.invert(pc.is_in(q.column("sample_id"),
                                        value_set=self.stored.column("sample_id"))))
        counts = {"stored": self.stored.num_rows, "rejected": 0, "failed": 0}
        if q.num_rows:
            codes = q.column("sample_id").dictionary_encode().combine_chunks().indices.to_numpy()
            _, last_rev = np.unique(codes[::-1], return_index=True)
            last = len(codes) - 1 - last_rev
            outcome = q.column("outcome").to_numpy()[last]
            counts["rejected"] = int((outcome == OUTCOME_CODES["rejected"]).sum())
            counts["failed"] = int((outcome == OUTCOME_CODES["failed"]).sum())
        return counts

    def merged(self) -> Manifest:
        """One manifest-shaped summary of the whole dataset (writer ``*``); its
        ``format_version`` is the newest of its writers'."""
        m0 = self.manifests[0]
        comps = {m.compression for m in self.manifests if m.shards} or {m0.compression}
        return Manifest(geometry=m0.geometry, writer="*",
                        compression=comps.pop() if len(comps) == 1 else "mixed",
                        shards=[s for m in self.manifests for s in m.shards],
                        quarantine=[q for m in self.manifests for q in m.quarantine],
                        outcomes=self.outcomes(), started=m0.started,
                        format_version=max(m.format_version for m in self.manifests))


def _load_writer(store: Store, name: str) -> tuple[Manifest, pa.Table]:
    """One writer's manifest and index; the index is read again with a fresh manifest when a
    newer publish replaced it meanwhile."""
    for attempt in range(_INDEX_RETRIES):
        man = _read_manifest(store, name)
        if man.index is None:
            return man, LOADED_SCHEMA.empty_table()
        try:
            data = store.read(man.index.file, MAX_MANIFEST_BYTES)
        except ShardError as e:
            if e.kind == "missing" and attempt + 1 < _INDEX_RETRIES:
                continue
            raise
        if (len(data) != man.index.bytes
                or object_digest(data, man.index.algorithm) != man.index.digest):
            raise ShardError(f"{man.index.file}: {len(data)} bytes whose {man.index.algorithm} "
                             f"does not match {name} (the index is corrupted or was replaced)",
                             file=man.index.file, kind="checksum")
        return man, parse_index(data, man.index.file, len(man.shards), man.index.rows,
                                man.format_version)
    raise AssertionError("unreachable")


def _read_manifest(store: Store, name: str) -> Manifest:
    """One writer's manifest. Manifests are the only objects replaced in place, and on an
    object store one replaced while it is read can come back cut short (pyarrow takes its size
    from one request and its bytes from the next): a read that is not whole JSON, or that
    fails, is repeated a few times before it counts. A local manifest is replaced by a rename
    and read whole."""
    for attempt in range(_MANIFEST_RETRIES):
        last = store.local is not None or attempt + 1 == _MANIFEST_RETRIES
        try:
            data = store.read(name, MAX_MANIFEST_BYTES)
            if not last:
                orjson.loads(data)
        except (orjson.JSONDecodeError, ShardError) as e:
            if last or (isinstance(e, ShardError) and e.kind != "unreadable"):
                raise
            time.sleep(0.02 * (attempt + 1))
            continue
        return Manifest.parse(data, name)
    raise AssertionError("unreachable")


def _only_shards(table: pa.Table, positions: list[int]) -> pa.Table:
    """Stored rows of the shards at ``positions`` (renumbered), quarantine rows unchanged."""
    shard = table.column("shard").to_numpy()
    remap = np.full(max(shard.max(initial=-1), 0) + 1, -1, np.int32)
    remap[positions] = np.arange(len(positions), dtype=np.int32)
    keep = (shard < 0) | np.isin(shard, positions)
    table = table.filter(pa.array(keep))
    shard = table.column("shard").to_numpy()
    new = np.where(shard >= 0, remap[np.maximum(shard, 0)], -1).astype(np.int32)
    return table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(new))
