"""``replay-bridge validate``: re-check a shard directory end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app
from ._output import (EXIT_FAULTS, EXIT_OK, die, dir_error, emit_json, escape_markup, progress,
                      stderr, stdout)


@app.command()
def validate(
    directory: Path = typer.Argument(..., help="Shard directory (holds manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Verify checksums, manifest counts, geometry, duplicate ids, the quarantine, and re-check
    every stored sample's routing.

    Exit 0 when clean, 1 when faults were found (a missing, truncated, corrupted or
    inconsistent file is named), 2 when DIR is not a readable shard directory.
    """
    from rich.table import Table

    from ..shards import ShardError
    from ..shards import MAX_LISTED_SAMPLE_FAULTS, validate_dir
    from ._tables import check_table

    try:
        from ..shards import Manifest

        total = Manifest.read(directory).samples
    except (ShardError, OSError) as e:
        die(dir_error(directory, e), as_json=as_json)
    with progress(enabled=not as_json) as bar:
        task = bar.add_task("validate", total=total, status="")
        try:
            report = validate_dir(directory, on_samples=lambda n: bar.advance(task, n))
        except (ShardError, OSError) as e:
            die(dir_error(directory, e), as_json=as_json)
    code = EXIT_OK if report.ok else EXIT_FAULTS
    if as_json:
        emit_json(report.to_dict())
        raise typer.Exit(code)

    m = report.manifest
    stdout.print(f"[bold]{escape_markup(directory)}[/]: {escape_markup(m.geometry.describe())}; "
                 f"{len(m.shards)} shards, "
                 f"{report.samples:,} samples, {report.tokens:,} tokens, "
                 f"{report.quarantine_records:,} quarantine records")
    stdout.print(check_table(report.tally, title="stored routing re-checked"))
    if report.faults:
        cut = report.sample_faults > MAX_LISTED_SAMPLE_FAULTS
        t = Table(title=f"faults ({len(report.faults)}"
                  f"{', routing faults truncated' if cut else ''})", title_justify="left")
        t.add_column("file")
        t.add_column("kind")
        t.add_column("message", overflow="fold")
        for f in report.faults:
            t.add_row(escape_markup(f.file), f.kind, escape_markup(f.message))
        stdout.print(t)
    for w in report.warnings:
        stderr.print(f"[yellow]warning:[/] {escape_markup(w)}")
    verdict = "[green]clean[/]" if report.ok else "[bold red]faults found[/]"
    stdout.print(f"validate: {verdict}")
    raise typer.Exit(code)
