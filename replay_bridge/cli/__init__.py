"""The ``replay-bridge`` command line.

Each command lives in its own module, which registers itself on :data:`app` (or
:data:`bench_app`) when imported below.
"""

from __future__ import annotations

from ._app import app, bench_app

# Command modules: importing one registers its commands.
from . import (  # noqa: E402,F401
    bench_ingest,
    bench_shards,
    collect,
    demo,
    ingest,
    inspect,
    serve,
    validate,
)

__all__ = ["app", "bench_app", "main"]


def main() -> None:
    app()
