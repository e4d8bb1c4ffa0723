"""The ``replay-bridge`` command line.

Each command lives in its own module, which registers itself on :data:`app` (or
:data:`bench_app`) when imported below.
"""

from __future__ import annotations

from ._app import app, bench_app

# Command modules: importing one registers its commands.
from . import ingest as _ingest  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import bench_shards as _bench_shards, inspect as _inspect, validate as _validate  # noqa: E402,F401,I001
from . import bench_ingest as _bench_ingest  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import collect as _collect  # noqa: E402,F401

__all__ = ["app", "bench_app", "main"]


def main() -> None:
    app()
