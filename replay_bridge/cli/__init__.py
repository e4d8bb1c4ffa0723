"""The ``replay-bridge`` command line.

Each command lives in its own module, which registers itself on :data:`app` (or
:data:`bench_app`) when imported below. Commands of other packages (the reference engine, the
recipes) are plugins: :func:`main` loads them from entry points (see ``_plugins``), so the
library never imports them. What a plugin needs to behave like the built-in commands (output
conventions, exit codes, check tables) is exported here.
"""

from __future__ import annotations

import typer

from ..allocator import keep_freed_memory
from ._app import app, bench_app, with_builtins
from ._output import (
    EXIT_FAULTS,
    EXIT_OK,
    EXIT_USAGE,
    die,
    dir_error,
    emit_json,
    progress,
    shown,
    stderr,
    stdout,
)
from ._inputs import dataset_uri
from ._plugins import GROUP as PLUGIN_GROUP
from ._plugins import load_plugins
from ._tables import check_table, verdict_table

# Command modules: importing one registers its commands.
from . import bench, cleanup, collect, ingest, inspect, validate  # noqa: E402,F401  isort: skip

__all__ = [
    "EXIT_FAULTS",
    "EXIT_OK",
    "EXIT_USAGE",
    "PLUGIN_GROUP",
    "app",
    "bench_app",
    "check_table",
    "command_line",
    "dataset_uri",
    "die",
    "dir_error",
    "emit_json",
    "load_plugins",
    "main",
    "progress",
    "shown",
    "stderr",
    "stdout",
    "verdict_table",
]

def command_line() -> typer.Typer:
    """The whole ``replay-bridge`` app: a fresh typer app holding the built-in commands and every
    installed plugin's (what :func:`main` runs; tests drive it with typer's ``CliRunner``)."""
    whole = with_builtins()
    load_plugins(whole)
    return whole


def main() -> None:
    """The ``replay-bridge`` entry point: built-in commands plus every installed plugin's. The
    process is the CLI's own, so it keeps freed memory for reuse
    (:mod:`replay_bridge.allocator`)."""
    keep_freed_memory()
    command_line()()
