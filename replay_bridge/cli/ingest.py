"""``replay-bridge ingest``: offline conversion of dumped engine traffic into shards."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._inputs import check_compression, check_input_file, check_out, dataset_uri, model_geometry
from ._output import EXIT_FAULTS, EXIT_OK, die, emit_json, escape_markup, progress, shown, stderr
from ._tables import check_table, verdict_table


@app.command()
def ingest(
    responses: Path = typer.Argument(..., help="JSONL of {sample_id, request, response} lines."),
    model: str = typer.Option(..., "--model", "-m",
                              help="Model directory, config.json, or preset name."),
    engine: str = typer.Option(..., "--engine", "-e", help="sglang | sglang-openai | vllm"),
    out: str = typer.Option(..., "--out", "-o",
                            help="Dataset URI to create: a directory, file://, s3://bucket/prefix "
                                 "(endpoint and keys from the AWS_* environment), gs://, ..."),
    append: bool = typer.Option(False, "--append",
                                help="Add to the dataset at --out (created when absent); several "
                                     "processes may append to one dataset at once."),
    compression: Optional[str] = typer.Option(None, help="zstd | lz4 | none (default: zstd)."),
    samples_per_shard: int = typer.Option(1024, min=1, help="Samples per shard file."),
    workers: int = typer.Option(1, min=0, help="Processes, each reading a part of the file "
                                               "into a writer of its own (pays on many cores); "
                                               "0: one per two CPUs, at most 8."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Decode, check and store dumped engine responses; faulty samples go to quarantine.

    Exit 0 when every sample was stored (or, with --append, stored by an earlier run or
    another writer), 1 when some were rejected, 2 on unreadable input or an unusable --out.
    """
    from ..geometry import GeometryMismatch
    from ..ingest import ingest as run_ingest
    from ..protocols import PROTOCOLS as ENGINES
    from ..shards import ShardError

    if engine not in ENGINES:
        die(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}", as_json=as_json)
    out = dataset_uri(out, "--out", as_json)
    check_input_file(responses, as_json)
    check_compression(compression, as_json)
    geometry = model_geometry(model, as_json)
    check_out(out, geometry, add=append, flag="--append", as_json=as_json)

    size = os.path.getsize(responses)
    options: dict = {"samples_per_shard": samples_per_shard}
    if compression is not None:
        options["compression"] = compression
    t0 = time.perf_counter()
    with progress(enabled=not as_json) as bar:
        task = bar.add_task("ingest", total=size, status="")
        shown_at = [0.0]

        def on_line(lines: int, done: int) -> None:
            now = time.monotonic()
            if now - shown_at[0] >= 0.1:
                shown_at[0] = now
                bar.update(task, completed=done, status=f"{lines} lines")

        try:
            result = run_ingest(responses, geometry, engine, out, append=append,
                                writer_options=options, on_line=on_line, workers=workers)
        except GeometryMismatch as e:
            die(f"cannot add to {shown(out)} with --append: {e}", as_json=as_json)
        except (ShardError, OSError) as e:
            die(f"cannot write {shown(out)}: {e}", as_json=as_json)
        bar.update(task, completed=size, status=f"{result.lines} lines")
    seconds = time.perf_counter() - t0

    # Ids an earlier run stored (a rerun after a crash) are not faults of this run.
    code = EXIT_OK if result.faults == 0 else EXIT_FAULTS
    if as_json:
        emit_json({
            "out": shown(out),
            "geometry": geometry.to_dict(),
            "engine": engine,
            "workers": result.workers,
            "seconds": round(seconds, 3),
            "totals": result.totals(),
            "check": result.tally.to_dict(),
            "samples": result.samples,
        })
    else:
        stderr.print(
            f"[bold]{result.stored}[/] stored, [bold]{result.rejected}[/] rejected of "
            f"{len(result.samples)} samples from {result.lines} lines in {seconds:.2f} s -> "
            f"{escape_markup(shown(out))}"
        )
        if result.rejected:
            stderr.print(verdict_table(result.samples))
        stderr.print(check_table(result.tally))
    raise typer.Exit(code)
