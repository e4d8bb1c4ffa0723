"""Where a dataset lives: a local directory or any ``pyarrow.fs`` filesystem, behind one URI.

A :class:`Store` names objects by their path relative to the dataset root (``part-....arrow``,
``_routing_replay/manifests/w.json``) and offers the few operations the shard format needs:
write an object once (:meth:`Store.create`, :meth:`Store.put`), read one whole or by ranges,
list a folder, delete. Local directories keep the crash-safe write (temp file created new,
never through a link, fsync, rename, fsync the folder) and read only regular files; object
stores publish an object when its upload completes, so nothing half-written is ever visible
under its name.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from ._checksum import checksums_for, object_hash
from ._errors import ShardError
from ._local import create_new, fsync_dir, regular_file, remove_stray
from ._schema import FORMAT_VERSION

__all__ = ["ObjectInfo", "ObjectWriter", "Store", "display_uri", "open_store"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def display_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` for messages and logs: user info (keys) and the query string dropped."""
    text = os.fspath(uri)
    if not _SCHEME.match(text):
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    """Path relative to the dataset root."""
    size: int
    mtime: float | None
    regular: bool = True
    """False for anything a local directory holds that is not a plain file (a link, a FIFO)."""


class ObjectWriter:
    """One object being written: bytes pass through the format's object digest (the whole
    object) and its block checksum (per block: :meth:`begin_block` / :meth:`end_block`);
    :meth:`commit` publishes it under its name, :meth:`abort` leaves nothing under that name."""

    checksums = checksums_for(FORMAT_VERSION)

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self.size = 0
        self._digest = self.checksums.object_hash()
        self._block = self.checksums.block_hash()
        self._block_start = 0
        self._skip = 0
        """Bytes still to come before the current block starts (kept out of its checksum)."""
        self._done = False
        if store.local is not None:
            self._tmp = store.temp_path(name)
            self._file = create_new(self._tmp)
            self._stream = None
        else:
            self._tmp = None
            self._file = None
            self._stream = store.fs.open_output_stream(store.path(name))

    # file-like (what pyarrow's IPC writer and the quarantine writer call)
    closed = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - any bytes-like object
        view = memoryview(data).cast("B")
        self._digest.update(view)
        if self._skip:
            n = min(self._skip, view.nbytes)
            self._skip -= n
            self._block.update(view[n:])
        else:
            self._block.update(view)
        if self._file is not None:
            self._file.write(view)
        else:
            self._stream.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def begin_block(self, at: int | None = None) -> None:
        """Start a block here, or at byte ``at`` (ahead: what comes before it is not in it)."""
        start = self.size if at is None else max(int(at), self.size)
        self._block_start, self._skip = start, start - self.size
        self._block = self.checksums.block_hash()

    def end_block(self) -> tuple[int, int, int]:
        """``(offset, length, checksum)`` of the bytes written since :meth:`begin_block`."""
        return self._block_start, self.size - self._block_start, self._block.intdigest()

    @property
    def hexdigest(self) -> str:
        """The whole object's digest (:attr:`checksums`' object algorithm)."""
        return self._digest.hexdigest()

    def commit(self) -> None:
        """Make the object visible under its name (durable on a local disk)."""
        if self._done:
            return
        self._done = True
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.store.local_path(self.name))
            fsync_dir(self._tmp.parent)
        else:
            self._stream.close()

    def abort(self) -> None:
        """Drop the object: a local temp file is removed; an upload is completed and deleted
        (pyarrow's object streams cannot be cancelled)."""
        if self._done:
            return
        self._done = True
        try:
            if self._file is not None:
                self._file.close()
                remove_stray(self._tmp)
            else:
                self._stream.close()
                self.store.delete(self.name)
        except (OSError, ShardError):
            pass


class Store:
    """A dataset root. Build one with :func:`open_store`."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str, local: Path | None) -> None:
        self.uri = uri
        self.display = display_uri(uri)
        self.fs = fs
        self.root = root.rstrip("/")
        self.local = local

    def __repr__(self) -> str:
        return f"Store({self.display!r})"

    def __reduce__(self):  # noqa: ANN204 - a store travels as its URI (no credentials)
        return (open_store, (self.uri,))

    # ---- names ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def local_path(self, name: str) -> Path:
        assert self.local is not None
        path = self.local / name
        if "/" in name:  # a folder of the format: it must not lead out of the dataset
            root = os.path.realpath(self.local)
            if not os.path.realpath(path.parent).startswith(root + os.sep):
                raise ShardError(f"{name} resolves outside the dataset", file=name,
                                 kind="unsafe_path")
        return path

    def temp_path(self, name: str) -> Path:
        path = self.local_path(name)
        return path.with_name(f".{path.name}.tmp")

    # ---- folders -------------------------------------------------------------------------

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.is_dir()
        info = self.fs.get_file_info(self.root)
        return info.type == pafs.FileType.Directory

    def make_dirs(self, *folders: str) -> None:
        if self.local is not None:
            if self.local.exists() and not self.local.is_dir():
                raise ShardError(f"{self.display} is not a directory")
            for folder in ("", *folders):
                path = self.local / folder if folder else self.local
                if path.is_symlink() and folder:
                    raise ShardError(f"{folder} is a symlink; the dataset's folders must be "
                                     "real folders", file=folder, kind="unsafe_path")
                path.mkdir(parents=True, exist_ok=True)
            return
        for folder in ("", *folders):
            try:
                self.fs.create_dir(self.path(folder) if folder else self.root, recursive=True)
            except OSError as e:
                raise ShardError(f"{self.display}: cannot create {folder or 'the dataset'}: "
                                 f"{_short(e)}") from None

    def list(self, folder: str = "") -> list[ObjectInfo]:
        """The objects directly inside ``folder`` (``""``: the root), sorted by name;
        nothing when the folder does not exist."""
        prefix = f"{folder}/" if folder else ""
        out = []
        if self.local is not None:
            base = self.local / folder if folder else self.local
            if base.is_symlink() and folder:
                raise ShardError(f"{folder} is a symlink", file=folder, kind="unsafe_path")
            try:
                entries = list(os.scandir(base))
            except FileNotFoundError:
                return []
            except NotADirectoryError:
                raise ShardError(f"{self.display}/{folder} is not a directory") from None
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue
                out.append(ObjectInfo(prefix + e.name, st.st_size, st.st_mtime,
                                      stat.S_ISREG(st.st_mode)))
        else:
            try:
                infos = self.fs.get_file_info(pafs.FileSelector(
                    self.path(folder) if folder else self.root, allow_not_found=True))
            except OSError as e:
                raise ShardError(f"{self.display}: cannot list {folder or 'the dataset'}: "
                                 f"{_short(e)}") from None
            for i in infos:
                if i.type != pafs.FileType.File:
                    continue
                mtime = i.mtime.timestamp() if i.mtime is not None else None
                out.append(ObjectInfo(prefix + i.base_name, i.size, mtime))
        return sorted(out, key=lambda o: o.name)

    # ---- objects -------------------------------------------------------------------------

    def create(self, name: str) -> ObjectWriter:
        return ObjectWriter(self, name)

    def put(self, name: str, data: bytes) -> None:
        """Write a whole object atomically (replacing one of that name)."""
        w = self.create(name)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.commit()

    def info(self, name: str) -> ObjectInfo | None:
        if self.local is not None:
            try:
                st = os.lstat(self.local_path(name))
            except FileNotFoundError:
                return None
            return ObjectInfo(name, st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))
        i = self.fs.get_file_info(self.path(name))
        if i.type == pafs.FileType.NotFound:
            return None
        return ObjectInfo(name, i.size or 0, i.mtime.timestamp() if i.mtime else None,
                          i.type == pafs.FileType.File)

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """A whole object; ``missing`` / ``unreadable`` :class:`ShardError` naming it."""
        if self.local is not None:
            with regular_file(self.local_path(name), name) as p:
                if max_bytes is not None and p.stat().st_size > max_bytes:
                    raise ShardError(f"{name} is implausibly large", file=name,
                                     kind="too_large")
                try:
                    return p.read_bytes()
                except OSError as e:
                    raise ShardError(f"{name}: cannot read: {e.strerror or e}",
                                     file=name) from None
        # An object replaced while it is read may come back cut short (its size and its bytes
        # come from different requests); only manifests are replaced, and their reader retries.
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise _remote_error(name, "read", e) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise ShardError(f"{name} is implausibly large", file=name, kind="too_large")
        return data

    def open(self, name: str) -> pa.NativeFile:
        """A random-access handle: a memory map of a local regular file, or a remote file
        whose ``read_at`` is a ranged read."""
        if self.local is not None:
            with regular_file(self.local_path(name), name) as p:
                try:
                    return pa.memory_map(str(p))
                except (OSError, pa.ArrowException) as e:
                    raise ShardError(f"{name}: cannot open: {e}", file=name) from None
        try:
            return self.fs.open_input_file(self.path(name))
        except OSError as e:
            raise _remote_error(name, "open", e) from None

    def delete(self, name: str) -> None:
        if self.local is not None:
            remove_stray(self.local_path(name))
            return
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def digest(self, name: str, algorithm: str) -> str:
        """The hex digest of a whole object, read in 4 MiB pieces."""
        h = object_hash(algorithm)
        with self.open(name) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()


def open_store(uri: str | os.PathLike[str]) -> Store:
    """The :class:`Store` of a dataset URI: a local path or ``file://`` URI, or any
    ``scheme://`` that :func:`pyarrow.fs.FileSystem.from_uri` resolves (``s3://``, ``gs://``,
    ``hdfs://``, ``abfs://``). For ``s3://`` without an ``endpoint_override`` the endpoint
    comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when one is set. Anything else
    is a :class:`ShardError` (never a local folder named after the scheme)."""
    if isinstance(uri, Store):
        return uri
    text = os.fspath(uri)
    m = _SCHEME.match(text)
    if not m or m.group(1).lower() == "file":
        path = Path(urlsplit(text).path if m else text)
        return Store(text, pafs.LocalFileSystem(), str(path.absolute()), path)
    scheme = m.group(1).lower()
    target = _with_s3_endpoint(text) if scheme == "s3" else text
    try:
        fs, root = pafs.FileSystem.from_uri(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ShardError(f"{display_uri(text)}: unsupported dataset URI ({_short(e)}); use a "
                         "local path, file://, s3://, gs://, hdfs:// or abfs://",
                         kind="uri") from None
    except OSError as e:
        raise ShardError(f"{display_uri(text)}: cannot reach the filesystem: {_short(e)}",
                         kind="uri") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Store(text, fs, root, Path(root))
    return Store(text, fs, root, None)


def _with_s3_endpoint(uri: str) -> str:
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "endpoint_override" in query or not endpoint:
        return uri
    ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query["endpoint_override"] = ep.netloc
    query.setdefault("scheme", ep.scheme or "https")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def _remote_error(name: str, verb: str, e: OSError) -> ShardError:
    """The :class:`ShardError` for a filesystem error on object ``name``: ``missing`` when
    the store says it does not exist, else what the store said (credentials redacted)."""
    if isinstance(e, FileNotFoundError) or _is_missing(e):
        return ShardError(f"{name}: missing", file=name, kind="missing")
    return ShardError(f"{name}: cannot {verb}: {_short(e)}", file=name)


def _is_missing(e: OSError) -> bool:
    """Whether an object store's error says the object does not exist (pyarrow's S3 client
    says ``NO_SUCH_KEY`` or ``RESOURCE_NOT_FOUND`` when an object went away between requests)."""
    text = str(e).lower().replace("_", "").replace(" ", "")
    return "notfound" in text or "nosuchkey" in text


def _short(e: BaseException) -> str:
    """An exception's text without anything that looks like a credential."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"(?i)(secret|token|key|signature|credential)[^\s,;]*[=:]\s*\S+",
                  r"\1=<redacted>", text)[:300]
