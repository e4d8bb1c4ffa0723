"""Checks of the arguments the commands share. Each bad one is a message naming it and exit 2
(:func:`~replay_bridge.cli.die`), before anything is written.

A dataset argument is a URI (:func:`dataset_uri`): a local path, ``file://``, or a
``scheme://`` of a filesystem pyarrow has (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``).
Only local paths are looked at here (``os.stat``); a remote dataset is checked by opening it
through the library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ._output import die, shown

if TYPE_CHECKING:
    from ..geometry import RoutingGeometry

__all__ = ["SCHEMES", "check_compression", "check_input_file", "check_out", "dataset_uri",
           "local_path", "model_geometry"]

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes of the filesystems pyarrow resolves (``pyarrow.fs.FileSystem.from_uri``)."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def model_geometry(model: str, as_json: bool) -> RoutingGeometry:
    """The routing geometry of ``--model`` (a model directory, a ``config.json`` or a preset),
    or exit 2: missing, unreadable, not JSON, not a routed MoE, absurd values."""
    from ..geometry import GeometryError, RoutingGeometry

    try:
        return RoutingGeometry.resolve(model)
    except GeometryError as e:
        die(str(e), as_json=as_json)
    except (OSError, ValueError, TypeError, KeyError) as e:  # a config.json of odd values
        die(f"--model {model}: cannot read a routing geometry: {type(e).__name__}: {e}",
            as_json=as_json)


def check_input_file(path: Path, as_json: bool) -> None:
    """``path`` is a regular file this process can read, or exit 2 (a FIFO or a directory is
    refused without opening it)."""
    if not path.exists():
        die(f"no such file: {path}", as_json=as_json)
    if not path.is_file():
        die(f"{path} is not a regular file", as_json=as_json)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}", as_json=as_json)


def check_compression(value: str | None, as_json: bool) -> None:
    """``--compression`` names a codec the writer has, or exit 2."""
    from ..shards import COMPRESSIONS

    if value is not None and value.lower() not in COMPRESSIONS:
        die(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {value!r}",
            as_json=as_json)


def dataset_uri(value: str, what: str, as_json: bool) -> str:
    """``value`` as a dataset URI, unchanged, or exit 2: empty, a ``scheme://`` of no
    filesystem pyarrow has (``http://``, ``ftp://``, a typo), or ``word:/x`` (one slash: a
    URI mistyped, never taken for a local folder named ``s3:``; ``./s3:/x`` is that folder).
    ``what`` names the argument in the message (``--out``, ``DATASET``)."""
    if not value.strip():
        die(f"{what} is empty: give a local path or a URI such as s3://bucket/prefix",
            as_json=as_json)
    m = _SCHEME.match(value)
    if m is not None:
        if m.group(1).lower() not in SCHEMES:
            die(f"{what} {shown(value)}: unsupported dataset URI scheme {m.group(1)}://; use a "
                "local path, file://, s3://, gs://, hdfs:// or abfs://", as_json=as_json)
        if m.group(1).lower() == "file" and urlsplit(value).netloc not in ("", "localhost"):
            die(f"{what} {shown(value)}: a file:// URI names a path of this machine "
                "(file:///path)", as_json=as_json)
        return value
    m = _ONE_SLASH.match(value)
    if m is not None:
        die(f"{what} {value}: not a URI ({m.group(1)}:/ has one slash) and not taken for a "
            f"local folder named {m.group(1)}:; write {m.group(1)}://... (or ./{value} for "
            "such a folder)", as_json=as_json)
    return value


def local_path(uri: str) -> Path | None:
    """The local path of a dataset URI (a plain path or ``file://``), ``None`` for a remote
    one."""
    m = _SCHEME.match(uri)
    if m is None:
        return Path(uri)
    if m.group(1).lower() == "file":
        return Path(urlsplit(uri).path)
    return None


def check_out(out: str, geometry: RoutingGeometry, *, add: bool, flag: str,
              as_json: bool) -> None:
    """``--out`` (a dataset URI, :func:`dataset_uri`) can take shards of ``geometry``, or exit
    2. Without ``add`` (``--append`` / ``--resume``) it must hold no dataset (a local path:
    absent or an empty directory); a dataset added to must be readable and of the same
    geometry. Where none is published yet, the writer creates it (the first of several
    writers does)."""
    from ..geometry import GeometryMismatch
    from ..shards import ShardError, ShardReader

    path = local_path(out)
    if path is not None:
        for parent in path.absolute().parents:  # the nearest folder that exists
            if parent.exists():
                if not parent.is_dir():
                    die(f"--out {shown(out)}: {parent} is not a directory", as_json=as_json)
                break
    if path is not None and (path.exists() or path.is_symlink()):
        if not path.is_dir():
            die(f"--out {shown(out)} is not a directory", as_json=as_json)
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            die(f"cannot read --out {shown(out)}: {e.strerror or e}", as_json=as_json)
        if empty:
            return
        if not add:
            die(f"{shown(out)} exists and is not empty; pass {flag} to add to it",
                as_json=as_json)
    try:
        stored = ShardReader(out, verify=False).geometry
    except (ShardError, OSError):
        # None published yet, or unreadable: the writer creates the dataset or says why not.
        return
    if not add:
        die(f"{shown(out)} holds a dataset; pass {flag} to add to it", as_json=as_json)
    try:
        stored.require_same(geometry, f"the shards in {shown(out)} and --model")
    except GeometryMismatch as e:
        die(f"cannot add to {shown(out)} with {flag}: {e}", as_json=as_json)
