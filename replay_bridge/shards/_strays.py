"""What a dataset holds that no manifest lists, and removing it.

Leftovers of writers that were killed (or are still writing): shards sealed but not yet
published, quarantine chunks likewise, index generations a newer publish replaced, local temp
files. Readers never see them; :func:`cleanup_dataset` removes those old enough that no live
writer can still be about to publish them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._manifest import (INDEX_DIR, INDEX_RE, MANIFEST_DIR, MANIFEST_RE, QUARANTINE_DIR,
                        QUARANTINE_RE, SHARD_RE, Manifest)
from ._store import ObjectInfo, Store, open_store

__all__ = ["CleanupReport", "cleanup_dataset", "strays"]


def _leftovers(store: Store, manifests: Sequence[Manifest]) -> Iterator[tuple[ObjectInfo, str]]:
    """``(object, what it is)`` for each object of the format that no manifest lists."""
    listed = set().union(*(m.files for m in manifests)) if manifests else set()
    for folder, pattern, what in (("", SHARD_RE, "unpublished shard"),
                                  (QUARANTINE_DIR, QUARANTINE_RE, "unpublished quarantine chunk"),
                                  (INDEX_DIR, INDEX_RE, "index replaced by a newer publish")):
        for o in store.list(folder):
            base = o.name.rsplit("/", 1)[-1]
            if base.startswith(".") and base.endswith(".tmp"):
                yield o, "temp file of an unfinished write"
            elif pattern.fullmatch(o.name) and o.name not in listed:
                yield o, what
    for o in store.list(MANIFEST_DIR):
        base = o.name.rsplit("/", 1)[-1]
        if base.startswith(".") and base.endswith(".tmp"):
            yield o, "temp file of an unfinished write"


def strays(store: Store, manifests: Sequence[Manifest]) -> list[str]:
    """Warnings for everything in the dataset that readers ignore."""
    out = [f"{o.name}: {what} (ignored by readers; `replay-bridge cleanup` removes it)"
           for o, what in _leftovers(store, manifests)]
    for o in store.list(""):
        if SHARD_RE.fullmatch(o.name) or o.name.startswith((".", "_")):
            continue
        out.append(f"{o.name}: not part of the dataset; pyarrow.dataset() over the dataset "
                   "will try to read it as a shard")
    for o in store.list(MANIFEST_DIR):
        if not MANIFEST_RE.fullmatch(o.name) and not o.name.rsplit("/", 1)[-1].startswith("."):
            out.append(f"{o.name}: not a manifest name (ignored)")
    return out


@dataclass
class CleanupReport:
    uri: str
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Leftovers younger than ``older_than`` (a live writer may still publish them)."""
    bytes: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "dry_run": self.dry_run, "removed": list(self.removed),
                "kept": list(self.kept), "bytes": self.bytes}


def cleanup_dataset(uri: str | os.PathLike[str], older_than: float = 3600.0,
                    dry_run: bool = False) -> CleanupReport:
    """Remove what no manifest lists and is at least ``older_than`` seconds old: unpublished
    shards and quarantine chunks of killed writers, replaced index generations, temp files.
    Published objects, manifests and files foreign to the format are never touched."""
    from ._dataset import DatasetView

    store = open_store(uri)
    manifests = DatasetView.load(store).manifests
    report = CleanupReport(store.display, dry_run=dry_run)
    now = time.time()
    for o, _what in _leftovers(store, manifests):
        if o.mtime is not None and now - o.mtime < older_than:
            report.kept.append(o.name)
            continue
        if not dry_run:
            store.delete(o.name)
        report.removed.append(o.name)
        report.bytes += o.size
    return report


