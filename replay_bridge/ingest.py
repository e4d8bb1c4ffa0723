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
from functools import partial
from pathlib import Path
from typing import Any

from .checks import CheckTally
from .geometry import RoutingGeometry
from .protocols import decode_parsed, get_protocol, load_payloads, unanswered, undecodable
from .sample import WireSample, field_problem, type_name
from .shards import ShardWriter
from .sink import SampleSink

__all__ = ["IngestResult", "default_workers", "ingest", "iter_lines", "line_ranges"]

MAX_DEFAULT_WORKERS = 8
"""Where ``--workers`` stopped paying on a 16-core host (docs/benchmarks.md)."""


def default_workers() -> int:
    """Workers for ``ingest(workers=0)``: one per two CPUs this process may use (each runs a
    decoding and a writer thread), at least 1, at most :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // 2))


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
    workers: int = 1
    """Processes that read the file."""

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


def iter_lines(path: str | Path, begin: int = 0,
               stop: int | None = None) -> Iterator[tuple[int, Any, int, int]]:
    """Yield ``(line_number, buffer, start, end)`` for every line that is not whitespace only,
    zero-copy.

    ``buffer`` is a read-only memory map of the whole file (``bytes`` for an empty file). The
    pages of lines already yielded are handed back every 32 MiB (``MADV_DONTNEED``: read again
    from the file if touched), so resident memory follows the line at hand, not the file.
    With ``begin`` (a line's first byte) and ``stop``, only the lines starting in
    ``[begin, stop)`` are read, numbered from 1 at ``begin``.
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
    stop = size if stop is None else min(stop, size)
    pos, lineno = begin, 0
    released = begin - begin % mmap.PAGESIZE
    try:
        while pos < stop:
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


def line_ranges(path: str | Path, parts: int) -> list[tuple[int, int]]:
    """Cut a file into at most ``parts`` byte ranges ``[begin, stop)`` of about equal size,
    each starting at a line's first byte (empty ranges are left out)."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    cuts = [0]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for i in range(1, max(parts, 1)):
                at = max(size * i // parts, cuts[-1])
                nl = mm.find(b"\n", at) if at < size else -1
                cuts.append(size if nl < 0 else nl + 1)
        finally:
            mm.close()
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class _LineNumber:
    """The 1-based number in the whole file of a line read from a range that starts mid-file,
    counted only when a message shows it (faulty lines are rare; counting the lines before
    the range costs a scan of them)."""

    __slots__ = ("_lines_before", "_local")

    def __init__(self, lines_before: Callable[[], int], local: int) -> None:
        self._lines_before, self._local = lines_before, local

    def __int__(self) -> int:
        return self._lines_before() + self._local

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    def __str__(self) -> str:
        return str(int(self))


def _lines_before(path: str | Path, begin: int) -> Callable[[], int]:
    """A function counting the lines that start before byte ``begin`` (once, when first
    called)."""
    counted: list[int] = []

    def count() -> int:
        if not counted:
            n = 0
            with open(path, "rb") as f:
                while (chunk := f.read(min(1 << 24, begin - f.tell()))):
                    n += chunk.count(b"\n")
            counted.append(n)
        return counted[0]
    return count


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
    buf: Any, start: int, end: int, lineno: int | _LineNumber, engine: str,
    geometry: RoutingGeometry
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
    workers: int = 1,
) -> IngestResult:
    """Decode, check and store every sample of a JSONL dump.

    Every sample goes through one :class:`~replay_bridge.sink.SampleSink`: good samples go to
    shards, faulty ones to the quarantine with their reasons, an id stored already is a
    ``duplicate``; a bad line is a verdict for that line, never an exception. Compression,
    hashing and writes run on the sink's writer thread. ``on_line(lines, byte_offset)``
    reports progress (lines read so far, bytes of the file done).

    ``out`` is a dataset URI (a directory, ``file://``, ``s3://bucket/prefix``, ...). With
    ``append`` this process adds to the dataset there as a writer of its own (the first writer
    creates it; several may append at once); an id any writer stored already is a
    ``duplicate``.

    ``workers > 1`` reads the file in that many byte ranges (cut at line starts) on as many
    processes, each a writer of its own into ``out`` (``writer_id``, when given, gets
    ``-<n>`` appended); sample ids are claimed through this process, so no id is stored
    twice. When one id is on several lines, one copy is stored and the others are
    ``duplicate`` verdicts: the first line's with one worker, any one of them with several.
    Verdicts come back in file order either way. ``workers=0`` picks :func:`default_workers`.
    """
    if workers == 0:
        workers = default_workers()
    if workers > 1:
        from ._ingest_pool import ingest_in_workers

        return ingest_in_workers(path, geometry, engine, out, append=append,
                                 writer_options=writer_options, on_line=on_line,
                                 workers=workers)
    options = dict(writer_options or {})
    if append:
        options["resume"] = True
    with ShardWriter(out, geometry, **options) as writer, \
            SampleSink(writer, background=True) as sink:
        result = IngestResult(tally=sink.tally)
        read_lines(path, engine, geometry, sink, result, on_line=on_line)
    return finish(result, sink)


def read_lines(path: str | Path, engine: str, geometry: RoutingGeometry, sink: SampleSink,
               result: IngestResult, *, begin: int = 0, stop: int | None = None,
               on_line: Callable[[int, int], None] | None = None,
               stopped: Callable[[], bool] | None = None) -> None:
    """Hand every sample of the lines starting in ``[begin, stop)`` to ``sink``, adding the
    lines and verdicts to ``result``; ``stopped()`` is asked before each line."""
    number: Callable[[int], int | _LineNumber] = (
        (lambda n: n) if begin == 0 else partial(_LineNumber, _lines_before(path, begin)))
    for lineno, buf, start, end in iter_lines(path, begin, stop):
        if stopped is not None and stopped():
            return
        result.lines += 1
        wires, lost = _line_samples(buf, start, end, number(lineno), engine, geometry)
        for ws in wires:
            result.samples.append(sink.add(ws).to_dict())
        for sid, message in lost:
            result.samples.append(sink.add_failure(sid, message).to_dict())
        if on_line is not None:
            on_line(lineno, end)


def finish(result: IngestResult, sink: SampleSink) -> IngestResult:
    """``result`` with the closed sink's counts."""
    result.stored = sink.counts["stored"]
    result.rejected = sink.counts["rejected"] + sink.counts["duplicate"] + sink.counts["failed"]
    result.faults = sink.faults
    result.tokens_stored = sink.tokens_stored
    return result
