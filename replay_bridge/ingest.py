"""Offline ingest: dumped engine traffic (JSONL) -> checked samples -> shards + quarantine.

Each line is ``{"sample_id": ..., "request": {...}, "response": {...}}`` (optionally
``group_id`` and ``policy_version``), exactly as sent to and received from the engine. The file is
memory-mapped; routing payloads are base64-decoded straight from the mapped bytes.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .checks import CheckReport, CheckTally, accept
from .geometry import RoutingGeometry
from .sample import WireSample
from .shards import ShardWriter
from .protocols import decode_parsed
from .protocols._assemble import failed
from .protocols._payload import split

__all__ = ["IngestResult", "ingest", "iter_lines"]


@dataclass
class IngestResult:
    """What ``ingest`` did: one verdict per sample, and the check tally."""

    tally: CheckTally
    samples: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    stored: int = 0
    rejected: int = 0
    tokens_stored: int = 0

    def totals(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "samples": len(self.samples),
            "stored": self.stored,
            "rejected": self.rejected,
            "tokens_stored": self.tokens_stored,
            "by_kind": self.tally.to_dict()["by_kind"],
        }


def iter_lines(path: str | Path) -> Iterator[tuple[int, Any, int, int]]:
    """Yield ``(line_number, buffer, start, end)`` for every non-blank line, zero-copy.

    ``buffer`` is a read-only memory map of the whole file (``bytes`` for an empty file).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    pos, lineno = 0, 0
    try:
        while pos < size:
            nl = mm.find(b"\n", pos)
            end = size if nl < 0 else nl
            lineno += 1
            # Skip blank lines (whitespace only) without copying long ones.
            if end - pos > 64 or mm[pos:end].strip():
                yield lineno, mm, pos, end
            pos = end + 1
    finally:
        try:
            mm.close()
        except BufferError:  # a caller still holds a view; the map closes when it is dropped
            pass


def _line_samples(
    buf: Any, start: int, end: int, lineno: int, engine: str, geometry: RoutingGeometry
) -> list[WireSample]:
    skeleton, payloads = split(buf, start, end)
    try:
        env = orjson.loads(skeleton)
    except orjson.JSONDecodeError as e:
        return [failed(f"line-{lineno}", "malformed", f"line {lineno} is not JSON: {e}", engine)]
    if not isinstance(env, dict):
        return [failed(f"line-{lineno}", "malformed", f"line {lineno} is not a JSON object",
                       engine)]
    sid = env.get("sample_id")
    sid = f"line-{lineno}" if sid is None else str(sid)
    missing = [k for k in ("request", "response") if k not in env]
    if missing:
        return [failed(sid, "malformed", f"line {lineno} has no {' or '.join(missing)}", engine)]
    group = env.get("group_id")
    version = env.get("policy_version")
    return decode_parsed(
        engine, env["request"], env["response"], payloads, geometry, sid,
        group_id=None if group is None else str(group),
        policy_version=version if isinstance(version, int) else None,
    )


class _WriterThread:
    """Runs a :class:`ShardWriter` on its own thread, fed through a bounded queue, so that
    compression, hashing and disk writes overlap decoding and checking (both release the GIL).

    The thread is the writer's only user. An error on the thread is raised on the caller's
    next ``submit`` or at ``close``.
    """

    _STOP = object()

    def __init__(self, writer: ShardWriter, depth: int = 16) -> None:
        self.writer = writer
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue
            method, args = item
            try:
                method(*args)
            except BaseException as e:  # surfaced on the caller's thread
                self._error = e

    def submit(self, method: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((method, args))

    def close(self) -> None:
        self._q.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error


def ingest(
    path: str | Path,
    geometry: RoutingGeometry,
    engine: str,
    out_dir: str | Path,
    *,
    writer_options: dict[str, Any] | None = None,
    on_line: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Decode, check and store every sample of a JSONL dump.

    Good samples go to shards, faulty ones to the quarantine with their reasons; a bad line is a
    verdict for that line, never an exception. ``on_line(lineno, byte_offset)`` reports progress.
    """
    result = IngestResult(tally=CheckTally(geometry))
    with ShardWriter(out_dir, geometry, **(writer_options or {})) as writer:
        seen = set(writer.stored_ids)
        background = _WriterThread(writer)
        try:
            for lineno, buf, start, end in iter_lines(path):
                result.lines += 1
                for ws in _line_samples(buf, start, end, lineno, engine, geometry):
                    report, routed = accept(ws, geometry)
                    verdict: dict[str, Any] = {"sample_id": ws.sample_id, "stored": False,
                                               "kinds": list(report.kinds)}
                    if routed is not None and ws.sample_id in seen:
                        report = CheckReport(
                            ws.sample_id, kinds=("duplicate_sample_id",),
                            message=f"sample {ws.sample_id!r}: duplicate_sample_id: already "
                                    "stored in this directory or earlier in the input")
                        verdict["kinds"] = ["duplicate_sample_id"]
                    elif routed is not None:
                        seen.add(ws.sample_id)
                        background.submit(writer.add, routed)
                        verdict["stored"] = True
                        result.stored += 1
                        result.tokens_stored += ws.num_tokens
                    else:
                        background.submit(writer.quarantine, report, ws)
                    if not verdict["stored"]:
                        result.rejected += 1
                        verdict["message"] = report.message
                    result.tally.add(report)
                    result.samples.append(verdict)
                if on_line is not None:
                    on_line(lineno, end)
        finally:
            background.close()
    return result
