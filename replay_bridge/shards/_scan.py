"""Open one shard file and read what indexing needs (ids, counts) without the routing.

Every shard and quarantine file is opened through :func:`regular_file`: only a regular file
is ever read, so a FIFO, a device or a directory under a member's name is an ``unreadable``
:class:`ShardError`, never a blocked ``open``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..geometry import GeometryMismatch, RoutingGeometry
from ._errors import ShardError
from ._schema import FORMAT_VERSION, geometry_from_schema

__all__ = ["ShardScan", "check_schema", "open_ipc", "regular_file", "scan_shard"]

_FD_DIR = Path("/proc/self/fd")
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}


@contextmanager
def regular_file(path: Path, name: str) -> Iterator[Path]:
    """A path to read ``path`` through, once it is known to be a regular file.

    The file is opened without blocking (``O_NONBLOCK``: a FIFO opens at once) and without
    following a symlink, and checked with ``fstat``; on Linux the path handed out is the open
    descriptor's (``/proc/self/fd/N``), so what is read is the file that was checked even if
    the name is replaced meanwhile. :class:`ShardError` ``unreadable`` (``missing`` when absent,
    ``unsafe_path`` for a symlink) naming ``name`` otherwise.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ShardError(f"{name}: missing", file=name, kind="missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ShardError(f"{name} is a symlink; shard files must be regular files",
                             file=name, kind="unsafe_path") from None
        raise ShardError(f"{name}: cannot open: {e.strerror or e}", file=name) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = _KINDS.get(stat.S_IFMT(mode), "not a file")
            raise ShardError(f"{name}: not a regular file ({what}); refusing to read it",
                             file=name)
        yield _FD_DIR / str(fd) if _FD_DIR.is_dir() else path
    finally:
        os.close(fd)


@dataclass
class ShardScan:
    ids: list[str] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0
    routed_rows: int = 0


def open_ipc(path: Path, name: str, geometry: RoutingGeometry,
             options: ipc.IpcReadOptions | None = None) -> ipc.RecordBatchFileReader:
    """Memory-map and open an IPC file (a regular file) whose schema must carry ``geometry``."""
    try:
        with regular_file(path, name) as p:
            source = pa.memory_map(str(p))
        reader = ipc.open_file(source, options=options)
    except FileNotFoundError:
        raise ShardError(f"{name}: missing", file=name, kind="missing") from None
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{name}: not a readable Arrow IPC file ({e})", file=name) from None
    check_schema(reader.schema, name, geometry, projected=options is not None)
    return reader


def check_schema(schema: pa.Schema, name: str, geometry: RoutingGeometry, *,
                 projected: bool = False) -> None:
    """A shard's schema: this format version, columns of the right types, ``geometry``."""
    got, version = geometry_from_schema(schema, name, projected=projected)
    if version != FORMAT_VERSION:
        raise ShardError(f"{name}: format_version {version}, expected {FORMAT_VERSION}",
                         file=name)
    try:
        geometry.require_same(got, f"{name} schema geometry and manifest geometry")
    except GeometryMismatch as e:
        raise ShardError(str(e), file=name, kind="geometry") from None


def scan_shard(path: Path, name: str, geometry: RoutingGeometry, *,
               what: str = "all") -> ShardScan:
    """Sample ids per batch and row / token / routing-row counts of one shard: ``what`` is
    ``"ids"``, ``"tokens"`` (ids and token counts) or ``"all"`` (also routing rows)."""
    schema_reader = open_ipc(path, name, geometry)
    names = schema_reader.schema.names
    cols = {"ids": ["sample_id"], "tokens": ["sample_id", "tokens"],
            "all": ["sample_id", "tokens", "routed"]}[what]
    opts = ipc.IpcReadOptions(included_fields=[names.index(c) for c in cols])
    reader = open_ipc(path, name, geometry, options=opts)
    scan = ShardScan()
    per_row = geometry.ids_per_token
    try:
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            b.validate(full=True)
            ids = b.column(0).to_pylist()
            if None in ids:
                raise ShardError(f"{name}: batch {i} has a null sample_id", file=name)
            scan.ids.extend(ids)
            scan.batch_rows.append(b.num_rows)
            if what != "ids":
                t = np.asarray(b.column(1).offsets)
                scan.tokens += int(t[-1] - t[0])
            if what == "all":
                r = b.column(2)
                n_ids = int(np.asarray(r.offsets)[-1] - np.asarray(r.offsets)[0])
                if n_ids % per_row:
                    raise ShardError(f"{name}: batch {i} holds {n_ids} routing ids, not a "
                                     f"whole number of {per_row}-id rows", file=name)
                scan.routed_rows += n_ids // per_row
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{name}: unreadable record batch ({e})", file=name) from None
    scan.rows = len(scan.ids)
    return scan
