"""The typer applications every command module registers on."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from copy import copy
from typing import Any

import typer

from ._output import die

SETTINGS = dict(
    name="replay-bridge",
    help="Carry MoE routing from RL rollouts to the trainer: collect, check, store, replay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app = typer.Typer(**SETTINGS)
"""The built-in commands (plugins are added to a copy: see ``replay_bridge.cli.command_line``)."""
bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def with_builtins() -> typer.Typer:
    """A new app holding the built-in commands, for plugins to be added to. Every built-in
    command runs under :func:`usage_guard`."""
    whole = typer.Typer(**SETTINGS)
    whole.registered_commands = [_guard(c) for c in app.registered_commands]
    whole.registered_groups = []
    for group in app.registered_groups:
        sub = copy(group.typer_instance)
        sub.registered_commands = [_guard(c) for c in sub.registered_commands]
        info = copy(group)
        info.typer_instance = sub
        whole.registered_groups.append(info)
    return whole


def _guard(command: Any) -> Any:
    guarded = copy(command)
    guarded.callback = usage_guard(command.callback)
    return guarded


def usage_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; an unusable input that escapes it (a model or shard directory that cannot
    be read, :class:`~replay_bridge.geometry.GeometryError`, ``GeometryMismatch``,
    :class:`~replay_bridge.shards.ShardError`, ``OSError``) becomes its message and exit 2
    (JSON with ``--json``), never a traceback. Commands check their arguments first and name
    them; this is the net under those checks."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is an input's fault
            if not _is_input_error(e):
                raise
            die(f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e),
                as_json=bool(kwargs.get("as_json")))

    return run


def _is_input_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    kinds = []
    for module, names in (("replay_bridge.geometry", ("GeometryError", "GeometryMismatch")),
                          ("replay_bridge.shards", ("ShardError",))):
        loaded = sys.modules.get(module)  # raised from there, so already imported
        kinds += [getattr(loaded, n) for n in names if loaded is not None]
    return isinstance(e, tuple(kinds))
