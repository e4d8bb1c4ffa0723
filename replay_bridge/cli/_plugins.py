"""Commands that other packages add to ``replay-bridge``, found through entry points.

A package declares ``[project.entry-points."replay_bridge.commands"]`` with
``name = "module:register"``; ``register(app)`` adds its commands to the typer app. This is how
the reference engine (``serve``, ``route``, ``make-tiny-model``) and the demo recipe (``demo``)
join the command line while the library never imports them. A plugin's module should import
only typer and this package at load time, and its heavy dependencies inside each command.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

__all__ = ["GROUP", "load_plugins"]

GROUP = "replay_bridge.commands"


def load_plugins(app: typer.Typer) -> list[str]:
    """Register every installed plugin's commands on ``app``; return the plugin names loaded.

    A plugin that fails to load is reported on stderr and skipped: the other commands keep
    working.
    """
    loaded = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
            register(app)
        except Exception as e:  # noqa: BLE001 - one broken plugin must not take the CLI down
            print(f"replay-bridge: commands of {ep.name!r} ({ep.value}) unavailable: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            continue
        loaded.append(ep.name)
    return loaded
