"""Helpers for the shard tests: write a directory, run the CLI, edit a manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import ShardWriter


def write_dir(path: Path, geometry, samples: list[RoutedSample], **options: Any) -> Path:
    with ShardWriter(path, geometry, **options) as w:
        for s in samples:
            w.add(s)
    return path


def run_cli(*args: str) -> tuple[int, Any, str]:
    """``(exit code, parsed JSON or None, output)``; fails on any exception but SystemExit."""
    result = CliRunner().invoke(command_line(), [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"crashed: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    try:
        doc = orjson.loads(result.stdout) if "--json" in args else None
    except orjson.JSONDecodeError:
        doc = None
    return result.exit_code, doc, result.output


def edit_manifest(directory: Path, fn) -> None:  # noqa: ANN001
    path = directory / "manifest.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))
