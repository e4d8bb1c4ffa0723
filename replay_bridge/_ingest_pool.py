"""``ingest`` on several processes.

The dump is cut into byte ranges at line starts; each worker process reads one range and
stores into the dataset as a writer of its own (one manifest, index and quarantine each),
so the only thing the workers share is the run's sample ids. Those are claimed through the
parent over each worker's pipe (one round trip per sample that passed its checks), which
also carries progress and, at the end, the worker's verdicts; the parent merges them in file
order. Workers are started through a fork server (safe in a process with threads, ~0.3 s
once per process, then a few ms per worker) or spawned where there is none.

A failing worker sets the run's stop event: every worker stops at its next line and closes
its writer, so what each had stored stays stored and listed; the parent then raises the
first error.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .allocator import keep_freed_memory
from .geometry import GeometryMismatch, RoutingGeometry
from .ingest import IngestResult, finish, read_lines, line_ranges
from .shards import ShardError, ShardWriter, display_uri, is_dataset
from .sink import SampleSink

__all__ = ["ingest_in_workers"]

_PROGRESS_EVERY_S = 0.1


def _context() -> Any:
    """The fork server, with what a worker imports loaded once in it: the bridge, and pandas
    where it is installed (pyarrow imports it at its first array, 0.27 s here)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    preload = ["replay_bridge.ingest", "replay_bridge._ingest_pool"]
    if importlib.util.find_spec("pandas") is not None:
        preload.append("pandas")
    ctx.set_forkserver_preload(preload)
    return ctx


def ingest_in_workers(path: str | Path, geometry: RoutingGeometry, engine: str,
                      out: str | os.PathLike[str], *, append: bool,
                      writer_options: dict[str, Any] | None,
                      on_line: Callable[[int, int], None] | None,
                      workers: int) -> IngestResult:
    """:func:`replay_bridge.ingest.ingest` with ``workers`` processes (see there)."""
    ranges = line_ranges(path, workers)
    if not append and is_dataset(out):
        raise ShardError(f"{display_uri(out)} already holds a dataset; pass append=True to "
                         "add to it", kind="manifest")
    if not ranges:  # an empty file: one writer makes the (empty) dataset as one worker would
        from .ingest import ingest

        return ingest(path, geometry, engine, out, append=append,
                      writer_options=writer_options, on_line=on_line)
    ctx = _context()
    stop = ctx.Event()
    pool = []
    for i, (begin, end) in enumerate(ranges):
        options = dict(writer_options or {}, resume=True)
        if "writer_id" in options and options["writer_id"] is not None:
            options["writer_id"] = f"{options['writer_id']}-{i}"
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_work, name=f"replay-bridge-ingest-{i}", daemon=True,
                           args=(theirs, stop, os.fspath(path), geometry, engine, out,
                                 options, begin, end))
        proc.start()
        theirs.close()
        pool.append((mine, proc))
    try:
        results = _serve(pool, ranges, stop, on_line)
    finally:
        stop.set()
        for conn, proc in pool:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
    total = IngestResult(tally=results[0].tally, workers=len(results))
    for r in results[1:]:
        total.tally.add_tally(r.tally)
    for r in results:
        total.samples.extend(r.samples)
        total.lines += r.lines
        total.stored += r.stored
        total.rejected += r.rejected
        total.faults += r.faults
        total.tokens_stored += r.tokens_stored
    return total


def _serve(pool: list[tuple[Connection, Any]], ranges: list[tuple[int, int]], stop: Any,
           on_line: Callable[[int, int], None] | None) -> list[IngestResult]:
    """Answer the workers until each has sent its result; raise the first error."""
    n = len(pool)
    owner: dict[str, int] = {}
    results: list[IngestResult | None] = [None] * n
    lines, done = [0] * n, [0] * n
    waiting: list[int] = []
    error: BaseException | None = None
    live = {conn: i for i, (conn, _) in enumerate(pool)}
    while live:
        for conn in wait(list(live), timeout=1.0):
            i = live[conn]  # type: ignore[index]
            try:
                kind, *args = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                pool[i][1].join(timeout=5)
                error = error or RuntimeError(
                    f"ingest worker {i} ended without a result (exit code "
                    f"{pool[i][1].exitcode}); a script that calls ingest with workers must "
                    "do so under `if __name__ == \"__main__\":` (its workers import it)")
                stop.set()
                del live[conn]
                continue
            if kind == "claim":
                conn.send(owner.setdefault(args[0], i) == i)  # type: ignore[union-attr]
            elif kind == "release":
                if owner.get(args[0]) == i:
                    del owner[args[0]]
            elif kind == "progress":
                lines[i], done[i] = args[0], args[1] - ranges[i][0]
                if on_line is not None:
                    on_line(sum(lines), sum(done))
            elif kind == "ready":
                waiting.append(i)
            elif kind == "done":
                results[i] = args[0]
                del live[conn]
            elif kind == "error":
                error = error or _rebuild(i, *args)
                stop.set()
                del live[conn]
            # Workers wait at the start until every writer is open, or, after an error, to stop.
            if waiting and (len(waiting) == n or error is not None):
                for j in waiting:
                    pool[j][0].send("go")
                waiting.clear()
    if error is not None:
        raise error
    if on_line is not None:
        on_line(sum(r.lines for r in results if r is not None), sum(b - a for a, b in ranges))
    return [r for r in results if r is not None]


class _PipeClaims:
    """:class:`~replay_bridge.sink.RunClaims` answered by the parent over the worker's pipe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def claim(self, sample_id: str) -> bool:
        self._conn.send(("claim", sample_id))
        return bool(self._conn.recv())

    def release(self, sample_id: str) -> None:
        self._conn.send(("release", sample_id))


def _work(conn: Connection, stop: Any, path: str, geometry: RoutingGeometry, engine: str,
          out: Any, options: dict[str, Any], begin: int, end: int) -> None:
    """One worker: its range of lines into a writer of its own."""
    keep_freed_memory()  # the process is ours
    try:
        with ShardWriter(out, geometry, **options) as writer, \
                SampleSink(writer, background=True, claims=_PipeClaims(conn)) as sink:
            conn.send(("ready",))
            conn.recv()  # every worker's writer is open: none saw another's ids as earlier
            result = IngestResult(tally=sink.tally)
            last = [0.0]

            def progress(lineno: int, offset: int) -> None:
                now = time.monotonic()
                if now - last[0] >= _PROGRESS_EVERY_S:
                    last[0] = now
                    conn.send(("progress", lineno, offset))

            read_lines(path, engine, geometry, sink, result, begin=begin, stop=end,
                       on_line=progress, stopped=stop.is_set)
        conn.send(("done", finish(result, sink)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            conn.send(("error", type(e).__name__, str(e), getattr(e, "file", None),
                       getattr(e, "kind", None)))
        except OSError:
            pass
    finally:
        conn.close()


def _rebuild(worker: int, name: str, message: str, file: str | None,
             kind: str | None) -> BaseException:
    """A worker's error as the parent raises it: the types ``ingest`` callers handle keep
    their type."""
    if name == "ShardError":
        return ShardError(message, file=file, kind=kind or "unreadable")
    if name == "GeometryMismatch":
        return GeometryMismatch(message)
    if name in ("OSError", "FileNotFoundError", "PermissionError"):
        return OSError(message)
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    return RuntimeError(f"ingest worker {worker}: {name}: {message}")
