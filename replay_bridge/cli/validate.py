"""``replay-bridge validate``: re-check a dataset end to end."""

from __future__ import annotations

import typer

from ._app import app
from ._inputs import dataset_uri
from ._output import (EXIT_FAULTS, EXIT_OK, die, dir_error, emit_json, escape_markup, progress,
                      shown, stderr, stdout)


def stored_count(uri: str) -> int | None:
    """How many samples the published manifests list (for a progress bar), ``None`` when the
    dataset cannot be opened as a whole (validate then says why)."""
    from ..shards import ShardError, ShardReader

    try:
        return len(ShardReader(uri, verify=False))
    except (ShardError, OSError):
        return None


@app.command()
def validate(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="Dataset URI: a directory, file://, s3://bucket/prefix, "
                                       "gs://, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Verify every object's checksum, the manifests' counts, geometry, ids stored twice (also
    by two writers), the quarantine, and re-check every stored sample's routing. Objects no
    manifest lists (left by a crashed writer) are reported; cleanup removes them.

    Exit 0 when clean, 1 when faults were found (a missing, truncated, corrupted or
    inconsistent object is named), 2 when DATASET is not a readable dataset.
    """
    from rich.table import Table

    from ..shards import MAX_LISTED_SAMPLE_FAULTS, ShardError, validate_dataset
    from ._tables import check_table

    dataset = dataset_uri(dataset, "DATASET", as_json)
    total = stored_count(dataset)
    with progress(enabled=not as_json) as bar:
        task = bar.add_task("validate", total=total, status="")
        try:
            report = validate_dataset(dataset, on_samples=lambda n: bar.advance(task, n))
        except (ShardError, OSError) as e:
            die(dir_error(dataset, e), as_json=as_json)
    code = EXIT_OK if report.ok else EXIT_FAULTS
    if as_json:
        emit_json(report.to_dict())
        raise typer.Exit(code)

    m = report.manifest
    stdout.print(f"[bold]{escape_markup(shown(dataset))}[/]: "
                 f"{escape_markup(m.geometry.describe())}; {len(m.shards)} shards, "
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
