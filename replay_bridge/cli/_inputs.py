"""Checks of the arguments the commands share. Each bad one is a message naming it and exit 2
(:func:`~replay_bridge.cli.die`), before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._output import die

if TYPE_CHECKING:
    from ..geometry import RoutingGeometry

__all__ = ["check_compression", "check_input_file", "check_out_dir", "model_geometry"]


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


def check_out_dir(out: Path, geometry: RoutingGeometry, *, add: bool, flag: str,
                  as_json: bool) -> None:
    """``--out`` can take shards of ``geometry``, or exit 2: absent, or a directory that is
    empty unless ``add`` (``--append`` / ``--resume``); a shard directory added to must be
    readable and of the same geometry."""
    from ..geometry import GeometryMismatch
    from ..shards import Manifest, ShardError

    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        die(f"--out {out} is not a directory", as_json=as_json)
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        die(f"cannot read --out {out}: {e.strerror or e}", as_json=as_json)
    if empty:
        return
    if not add:
        die(f"{out} exists and is not empty; pass {flag} to add to it", as_json=as_json)
    if not (out / "manifest.json").exists():
        return  # the writer says whether it can start here (stray shard files: refused)
    try:
        stored = Manifest.read(out).geometry
        stored.require_same(geometry, f"the shards in {out} and --model")
    except ShardError as e:
        die(f"cannot add to {out}: {e}", as_json=as_json)
    except GeometryMismatch as e:
        die(f"cannot add to {out} with {flag}: {e}", as_json=as_json)
