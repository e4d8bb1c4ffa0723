"""``replay-bridge cleanup``: remove the objects of a dataset that no manifest lists."""

from __future__ import annotations

import typer

from ._app import app
from ._inputs import dataset_uri
from ._output import EXIT_OK, die, dir_error, emit_json, escape_markup, shown, stdout


@app.command()
def cleanup(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="Dataset URI: a directory, file://, s3://bucket/prefix, "
                                       "gs://, ..."),
    older_than: float = typer.Option(
        3600.0, "--older-than", min=0.0, metavar="SECONDS",
        help="Remove only unlisted objects older than this (a running writer publishes what "
             "it is writing now; keep this longer than any writer's seal interval)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Remove what crashed writers left: shard, index and quarantine objects no published
    manifest lists, and temp files, older than --older-than. Published objects are never
    touched, so readers and running writers are unaffected.

    Exit 0, or 2 when DATASET is not a readable dataset.
    """
    from ..shards import ShardError, cleanup_dataset

    dataset = dataset_uri(dataset, "DATASET", as_json)
    try:
        report = cleanup_dataset(dataset, older_than=older_than, dry_run=dry_run)
    except (ShardError, OSError) as e:
        die(dir_error(dataset, e), as_json=as_json)
    if as_json:
        emit_json({"dataset": shown(dataset), "older_than": older_than, "dry_run": dry_run,
                   **report.to_dict()})
        raise typer.Exit(EXIT_OK)
    verb = "would remove" if dry_run else "removed"
    for name in report.removed:
        stdout.print(f"{verb} {escape_markup(name)}")
    stdout.print(f"[bold]{escape_markup(shown(dataset))}[/]: {verb} {len(report.removed)} "
                 f"unlisted object(s); kept {len(report.kept)} younger than "
                 f"{older_than:g} s")
    raise typer.Exit(EXIT_OK)
