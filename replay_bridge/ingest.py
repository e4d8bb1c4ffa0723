"""Offline ingest: dumped engine traffic (JSONL) -> checked samples -> shards + quarantine.

Each line is ``{"sample_id": ..., "request": {...}, "response": {...}}`` (optionally
``group_id`` and ``policy_version``), exactly as sent to and received from the engine. The file is
memory-mapped; routing payloads are base64-decoded straight from the mapped bytes.

The envelope is checked where it enters: ``sample_id`` a non-empty string, ``group_id`` a string
(or absent), ``policy_version`` an int64 (or absent); lines of whitespace only are skipped. A
line that is not a JSON object, or names no usable sample id, is one ``malformed`` verdict
labelled ``line-<N>`` (its 1-based line number): it is quarantined, never stored, and no id is
made up for its samples, so it never takes a real sample's id nor makes one a duplicate (the
label is not an id, though a real id may spell the same text). Any other bad value
is a verdict for that line's sample(s), and the next line is read. The samples a request asks
for that its answer does not hold (fewer vLLM choices than ``n``) are ``failed``.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import CheckTally
from .geometry import RoutingGeometry
from .protocols import decode_parsed, get_protocol, load_payloads, unanswered, undecodable
from .sample import WireSample, field_problem, type_name
from .shards import ShardWriter
from .sink import SampleSink

__all__ = ["IngestResult", "ingest", "iter_lines"]


@dataclass
class IngestResult:
    """What ``ingest`` did: one verdict per sample (:meth:`replay_bridge.sink.Verdict.to_dict`),
    and the check tally. ``rejected`` counts the samples not stored: outcome ``rejected``,
    ``duplicate`` or ``failed`` (``by_kind`` and the verdicts tell them apart)."""

    tally: CheckTally
    samples: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    stored: int = 0
    rejected: int = 0
    faults: int = 0
    """Samples not stored for a fault of this run (``rejected`` less ids an earlier run stored:
    :attr:`replay_bridge.sink.SampleSink.faults`)."""
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


_NOT_BLANK = re.compile(rb"[^ \t\r\n\x0b\x0c]")


def iter_lines(path: str | Path) -> Iterator[tuple[int, Any, int, int]]:
    """Yield ``(line_number, buffer, start, end)`` for every line that is not whitespace only,
    zero-copy.

    ``buffer`` is a read-only memory map of the whole file (``bytes`` for an empty file). The
    pages of lines already yielded are handed back every 32 MiB (``MADV_DONTNEED``: read again
    from the file if touched), so resident memory follows the line at hand, not the file.
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
    pos, lineno, released = 0, 0, 0
    try:
        while pos < size:
            nl = mm.find(b"\n", pos)
            end = size if nl < 0 else nl
            lineno += 1
            # Skip blank lines (whitespace only), looking no further than the first other byte.
            if _NOT_BLANK.search(mm, pos, end):
                yield lineno, mm, pos, end
            pos = end + 1
            if pos - released >= _RELEASE_BYTES:
                released = _release(mm, released, pos)
    finally:
        try:
            mm.close()
        except BufferError:  # a caller still holds a view; the map closes when it is dropped
            pass


_RELEASE_BYTES = 32 << 20


def _release(mm: mmap.mmap, start: int, end: int) -> int:
    """Drop the mapped pages of ``[start, end)`` (page-aligned ``start``) from this process;
    return the new aligned start."""
    cut = end - end % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, cut - start)
    except (AttributeError, OSError, ValueError):
        return start
    return cut


Unanswered = list[tuple[str, str]]
"""``(sample_id, message)`` of asked-for samples an answer holds none for."""


def _line_samples(
    buf: Any, start: int, end: int, lineno: int, engine: str, geometry: RoutingGeometry
) -> tuple[list[WireSample], Unanswered]:
    def refused(message: str, sid: str | None = None) -> tuple[list[WireSample], Unanswered]:
        return [undecodable(sid or f"line-{lineno}", "malformed", message, engine)], []

    try:
        env, payloads = load_payloads(buf, start, end)
    except ValueError as e:
        return refused(f"line {lineno} is not JSON: {e}")
    if not isinstance(env, dict):
        return refused(f"line {lineno} is {type_name(env)}, not a JSON object")
    sid = env.get("sample_id")
    problem = field_problem("sample_id", sid)
    if problem is not None:
        return refused(f"line {lineno}: {problem}; a line without a usable sample id is not "
                       "stored")
    missing = [k for k in ("request", "response") if k not in env]
    if missing:
        return refused(f"line {lineno} has no {' or '.join(missing)}", sid)
    group, version = env.get("group_id"), env.get("policy_version")
    problem = field_problem("group_id", group) or field_problem("policy_version", version)
    if problem is not None:
        return refused(f"line {lineno}: {problem}", sid)
    request = env["request"]
    wires = decode_parsed(engine, request, env["response"], payloads, geometry, sid,
                          group_id=group, policy_version=version)
    lost = unanswered(engine, request, wires, sid)
    if not lost:
        return wires, []
    asked = get_protocol(engine).samples_asked(request)
    return wires, [(m, f"sample {m!r}: the answer on line {lineno} held {len(wires)} samples "
                       f"for {asked} asked for; none for this one") for m in lost]


def ingest(
    path: str | Path,
    geometry: RoutingGeometry,
    engine: str,
    out: str | os.PathLike[str],
    *,
    append: bool = False,
    writer_options: dict[str, Any] | None = None,
    on_line: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Decode, check and store every sample of a JSONL dump.

    Every sample goes through one :class:`~replay_bridge.sink.SampleSink`: good samples go to
    shards, faulty ones to the quarantine with their reasons, an id stored already is a
    ``duplicate``; a bad line is a verdict for that line, never an exception. Compression,
    hashing and writes run on the sink's writer thread. ``on_line(lineno, byte_offset)``
    reports progress.

    ``out`` is a dataset URI (a directory, ``file://``, ``s3://bucket/prefix``, ...). With
    ``append`` this process adds to the dataset there as a writer of its own (the first writer
    creates it; several may append at once); an id any writer stored already is a
    ``duplicate``.
    """
    options = dict(writer_options or {})
    if append:
        options["resume"] = True
    with ShardWriter(out, geometry, **options) as writer, \
            SampleSink(writer, background=True) as sink:
        result = IngestResult(tally=sink.tally)
        for lineno, buf, start, end in iter_lines(path):
            result.lines += 1
            wires, lost = _line_samples(buf, start, end, lineno, engine, geometry)
            for ws in wires:
                result.samples.append(sink.add(ws).to_dict())
            for sid, message in lost:
                result.samples.append(sink.add_failure(sid, message).to_dict())
            if on_line is not None:
                on_line(lineno, end)
    result.stored = sink.counts["stored"]
    result.rejected = sink.counts["rejected"] + sink.counts["duplicate"] + sink.counts["failed"]
    result.faults = sink.faults
    result.tokens_stored = sink.tokens_stored
    return result
