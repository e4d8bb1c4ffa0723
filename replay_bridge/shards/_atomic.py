"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

A temp file is always created anew (``O_CREAT | O_EXCL | O_NOFOLLOW``) after removing whatever
held its name (a stale file, or a symlink placed there: the link itself is removed, never what
it points to), so no write ever goes through a link out of the directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

from ._errors import ShardError

__all__ = ["HashingFile", "TMP_SUFFIX", "atomic_write", "create_new", "fsync_dir",
           "remove_stray", "sha256_file"]

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 22
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def remove_stray(path: Path) -> None:
    """Remove ``path`` if anything holds that name: a file or a symlink (the link, never its
    target). A directory there is a :class:`ShardError` (never removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ShardError(f"{path.name} is a directory where the writer needs a temp file; "
                         "remove it", file=path.name, kind="unsafe_path")
    os.unlink(path)


def create_new(path: Path) -> io.BufferedWriter:
    """Open ``path`` for writing as a new regular file: whatever held the name is removed
    first (:func:`remove_stray`), then it is created exclusively, never through a symlink."""
    remove_stray(path)
    try:
        fd = os.open(path, _NEW, 0o644)
    except FileExistsError:  # placed again between the unlink and the open
        raise ShardError(f"{path.name} appeared while the writer was creating it; another "
                         "process writes to this directory", file=path.name,
                         kind="unsafe_path") from None
    return os.fdopen(fd, "wb")


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
    with create_new(tmp) as f:
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
    """A write-only new file (:func:`create_new`) that hashes (sha256) and counts what passes
    through it."""

    def __init__(self, path: Path) -> None:
        self._f = create_new(path)
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

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync)."""
        if not self._f.closed:
            self._f.flush()

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
