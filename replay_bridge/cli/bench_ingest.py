"""``replay-bridge bench ingest``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import bench_app
from ._output import emit_json


@bench_app.command("ingest")
def bench_ingest(
    tokens: int = typer.Option(400_000, min=1, help="Tokens of SGLang traffic to generate."),
    model: str = typer.Option("qwen3-30b-a3b", help="Model preset, directory or config.json."),
    repeats: int = typer.Option(3, min=1, help="Rounds; figures are medians."),
    peer: bool = typer.Option(True, help="Also time the usual torch-based peer chain."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put temporary files."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Ingest time vs pybase64 b64decode of the same payloads (the floor) vs a peer chain."""
    from ..benchmarks.ingest import run

    emit_json(run(tokens=tokens, model=model, repeats=repeats, peer=peer, workdir=workdir))
