"""``replay-bridge inspect``: totals, storage cost and expert load of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._inputs import dataset_uri, local_path
from ._output import EXIT_OK, die, dir_error, emit_json, escape_markup, progress, shown, stdout


@app.command()
def inspect(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="Dataset URI: a directory, file://, s3://bucket/prefix, "
                                       "gs://, ..."),
    plot: Optional[Path] = typer.Option(None, "--plot",
                                        help="Write an expert-load heatmap PNG (a local file "
                                             "outside the dataset)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Samples, tokens, quarantined; bytes per token (and vs int32); expert load per MoE layer.

    Exit 0, or 2 when DATASET is not a readable dataset or --plot points into it (checksums:
    see ``validate``).
    """
    from rich.table import Table

    from ..inspection import inspect_dataset, plot_load
    from ..shards import ShardError, ShardReader

    dataset = dataset_uri(dataset, "DATASET", as_json)
    if plot is not None:
        check_plot_outside(plot, dataset, as_json)
    try:
        total = len(ShardReader(dataset, verify=False))
        with progress(enabled=not as_json) as bar:
            task = bar.add_task("inspect", total=total, status="")
            result = inspect_dataset(dataset, on_samples=lambda n: bar.advance(task, n))
    except (ShardError, OSError) as e:
        die(dir_error(dataset, e), as_json=as_json)
    plotted = None
    if plot is not None:
        try:
            plotted = str(plot_load(result, plot))
        except ImportError:
            die("--plot needs matplotlib: pip install 'routing-replay-bridge[plot]'",
                as_json=as_json)
        except OSError as e:
            die(f"cannot write {plot}: {e}", as_json=as_json)
    if as_json:
        emit_json({**result.to_dict(), "plot": plotted})
        raise typer.Exit(EXIT_OK)

    m, g = result.manifest, result.geometry
    stdout.print(f"[bold]{escape_markup(shown(dataset))}[/]: {escape_markup(g.describe())}, "
                 f"{escape_markup(m.compression)} compression")
    stdout.print(
        f"{m.samples:,} samples, {m.tokens:,} tokens in {len(m.shards)} shards; "
        f"{m.outcomes['rejected']:,} rejected and {m.outcomes['failed']:,} failed in quarantine")
    stdout.print(
        f"{m.bytes:,} bytes: {result.bytes_per_token:.1f} B/token, "
        f"{result.bytes_per_token / result.int32_bytes_per_token:.3f}x the "
        f"{result.int32_bytes_per_token} B/token of int32 wire routing")
    rows = result.layer_summary()
    ratios = sorted(r["max_over_mean"] for r in rows)
    worst = max(rows, key=lambda r: r["max_over_mean"])
    stdout.print(
        f"expert load max/mean over {len(rows)} MoE layers: min {ratios[0]:.2f}, median "
        f"{ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f} (layer {worst['layer']}, "
        f"expert {worst['hottest_expert']})")
    t = Table(title="expert load per MoE layer", title_justify="left")
    for col in ("layer", "max/mean", "min/mean", "cv", "hottest expert", "share", "idle"):
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(str(row["layer"]), f"{row['max_over_mean']:.2f}", f"{row['min_over_mean']:.2f}",
                  f"{row['cv']:.2f}", str(row["hottest_expert"]),
                  f"{100 * row['hottest_share']:.2f}%", str(row["idle_experts"]))
    stdout.print(t)
    if plotted:
        stdout.print(f"heatmap: {escape_markup(plotted)}")


def check_plot_outside(plot: Path, dataset: str, as_json: bool) -> None:
    """``--plot`` is not inside a local dataset (whose folder holds only shards and the
    ``_``-prefixed metadata that readers such as ``pyarrow.dataset`` skip), or exit 2."""
    root = local_path(dataset)
    if root is None:
        return
    target = plot.absolute().resolve()
    if target == root.absolute().resolve() or root.absolute().resolve() in target.parents:
        sibling = root.absolute().parent / f"{root.absolute().name}-{plot.name}"
        die(f"--plot {plot} is inside the dataset {shown(dataset)}: a dataset holds only its "
            f"shards; write the plot next to it (for example {sibling})", as_json=as_json)
