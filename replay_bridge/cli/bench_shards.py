"""``replay-bridge bench shards``: bytes per token and read/write speed per compression."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import bench_app
from ._output import die, emit_json


@bench_app.command("shards")
def bench_shards_cmd(
    tokens: int = typer.Option(400_000, min=1000, help="Tokens of synthetic samples to store."),
    model: str = typer.Option("qwen3-30b-a3b", "--model", "-m", help="Geometry preset."),
    samples_per_shard: int = typer.Option(64, min=1),
    batch_bytes: Optional[int] = typer.Option(
        None, min=1, help="Routing bytes per record batch (default: the writer's)."),
    repeats: int = typer.Option(3, min=1, help="Timings are the best of this many runs."),
    lookups: int = typer.Option(200, min=1, help="Random per-sample lookups timed."),
    workdir: Optional[Path] = typer.Option(None, help="Where to write (default: temp dir)."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON (always printed)."),
) -> None:
    """Write the same realistic samples with zstd (levels), lz4 and none; report bytes per
    token (vs int32), write MB/s, read-back GB/s of routing arrays and lookups, side by side."""
    from ..benchmarks.shards import bench_shards
    from ..geometry import GeometryError

    try:
        result = bench_shards(tokens=tokens, preset=model, samples_per_shard=samples_per_shard,
                              batch_bytes=batch_bytes, repeats=repeats, lookups=lookups,
                              workdir=workdir)
    except GeometryError as e:
        die(str(e), as_json=True)
    emit_json(result)
