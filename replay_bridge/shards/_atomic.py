"""Crash-safe file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

__all__ = ["HashingFile", "TMP_SUFFIX", "atomic_write", "fsync_dir", "sha256_file"]

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 22


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temp file and rename; return its sha256 (hex)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class HashingFile(io.RawIOBase):
    """A write-only file that hashes (sha256) and counts what passes through it."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - any bytes-like object
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()
