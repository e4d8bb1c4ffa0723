"""Shared output conventions: JSON on stdout, humans on stderr, exit codes.

Exit codes: 0 success, 1 faults found, 2 usage error or unreadable input. Text that comes
from input (paths, ids, messages) is printed with its ``[...]`` escaped (``escape``), never
read as rich markup.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAULTS, EXIT_USAGE = 0, 1, 2

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)


def escape_markup(text: object) -> str:
    """``text`` as literal rich text: ``[`` of a path, sample id or message is never markup."""
    return escape(str(text))


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout."""
    sys.stdout.buffer.write(
        orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                     | orjson.OPT_NON_STR_KEYS) + b"\n"
    )
    sys.stdout.flush()


def die(message: str, code: int = EXIT_USAGE, as_json: bool = False) -> NoReturn:
    """Report an error (as JSON on stdout with ``--json``) and exit."""
    if as_json:
        emit_json({"error": message, "exit_code": code})
    else:
        stderr.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def shown(uri: object) -> str:
    """A dataset URI or path as messages and JSON show it: no credentials, no query string
    (:func:`replay_bridge.shards.display_uri`)."""
    from ..shards import display_uri

    return display_uri(str(uri))


def dir_error(directory: object, error: BaseException) -> str:
    """An error about a dataset (a directory or URI, shown without credentials), naming it
    once."""
    name = shown(directory)
    return str(error) if name in str(error) else f"{name}: {error}"


def progress(enabled: bool = True):  # noqa: ANN201 - rich.progress.Progress
    """A progress bar on stderr, shown only on a terminal."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not (enabled and stderr.is_terminal),
        transient=False,
    )
