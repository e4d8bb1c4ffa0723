"""Offline ingest: dumped engine traffic (JSONL) -> checked samples -> shards + quarantine.

Each line is ``{"sample_id": ..., "request": {...}, "response": {...}}`` (optionally
``group_id`` and ``policy_version``), exactly as sent to and received from the engine. The file is
memory-mapped; routing payloads are base64-decoded straight from the mapped bytes.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .checks import CheckTally
from .geometry import RoutingGeometry
from .protocols import decode_parsed, split_payloads, undecodable
from .sample import WireSample
from .shards import ShardWriter
from .sink import SampleSink

__all__ = ["IngestResult", "ingest", "iter_lines"]


@dataclass
class IngestResult:
    """What ``ingest`` did: one verdict per sample (:meth:`replay_bridge.sink.Verdict.to_dict`),
    and the check tally. ``rejected`` counts the samples not stored: outcome ``rejected`` or
    ``duplicate`` (``by_kind`` tells them apart)."""

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
    skeleton, payloads = split_payloads(buf, start, end)
    try:
        env = orjson.loads(skeleton)
    except orjson.JSONDecodeError as e:
        return [undecodable(f"line-{lineno}", "malformed", f"line {lineno} is not JSON: {e}",
                            engine)]
    if not isinstance(env, dict):
        return [undecodable(f"line-{lineno}", "malformed",
                            f"line {lineno} is not a JSON object", engine)]
    sid = env.get("sample_id")
    sid = f"line-{lineno}" if sid is None else str(sid)
    missing = [k for k in ("request", "response") if k not in env]
    if missing:
        return [undecodable(sid, "malformed", f"line {lineno} has no {' or '.join(missing)}",
                            engine)]
    group = env.get("group_id")
    version = env.get("policy_version")
    return decode_parsed(
        engine, env["request"], env["response"], payloads, geometry, sid,
        group_id=None if group is None else str(group),
        policy_version=version if isinstance(version, int) else None,
    )


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

    Every sample goes through one :class:`~replay_bridge.sink.SampleSink`: good samples go to
    shards, faulty ones to the quarantine with their reasons, an id stored already is a
    ``duplicate``; a bad line is a verdict for that line, never an exception. Compression,
    hashing and writes run on the sink's writer thread. ``on_line(lineno, byte_offset)``
    reports progress.
    """
    with ShardWriter(out_dir, geometry, **(writer_options or {})) as writer, \
            SampleSink(writer, background=True) as sink:
        result = IngestResult(tally=sink.tally)
        for lineno, buf, start, end in iter_lines(path):
            result.lines += 1
            for ws in _line_samples(buf, start, end, lineno, engine, geometry):
                result.samples.append(sink.add(ws).to_dict())
            if on_line is not None:
                on_line(lineno, end)
    result.stored = sink.counts["stored"]
    result.rejected = sink.counts["rejected"] + sink.counts["duplicate"]
    result.tokens_stored = sink.tokens_stored
    return result
