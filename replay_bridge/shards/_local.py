"""Local files, safely: writes never go through a link, reads only ever of regular files.

A file is always created anew (``O_CREAT | O_EXCL | O_NOFOLLOW``) after removing whatever held
its name (a stale file, or a symlink placed there: the link itself is removed, never what it
points to), so no write goes through a link out of the dataset. A file is read only once it is
known to be a regular file (:func:`regular_file`): a FIFO, a device or a directory under an
object's name is an ``unreadable`` :class:`ShardError`, never a blocked ``open``.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._errors import ShardError

__all__ = ["create_new", "fsync_dir", "regular_file", "remove_stray"]

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)
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
