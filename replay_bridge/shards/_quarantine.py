"""Quarantine records: rejected samples (with their check report) and failed requests.

A record's ``outcome`` is ``rejected`` or ``failed`` and its ``kinds`` say why (the outcome and
kind vocabulary: ``docs/shards.md``, "Outcomes and verdict kinds").

Records are JSON objects, one per line, in ``quarantine-NNNNNN.jsonl`` chunks. A record is
written to the open chunk (``NAME.tmp``) as soon as it comes, its routing base64-encoded piece
by piece, so nothing of it stays in memory; a chunk is sealed (fsync, rename, then listed in the
manifest) when it reaches its size or record bound and whenever the writer flushes, so a crash
loses at most the open chunk and never tears a listed one. Routing travels as base64 of its raw
little-endian bytes, with dtype and shape.

Outcome counts count sample ids, each once (:class:`OutcomeLedger`): an id stored in a shard
counts as ``stored`` whatever its records say; any other id counts under the outcome of its
latest record (chunks in manifest order, lines in order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson
import pybase64

from ..checks import CheckReport
from ..sample import RoutedSample, WireSample
from ._checksum import object_digest
from ._errors import ShardError
from ._manifest import QuarantineEntry, check_listed
from ._store import Store

__all__ = ["ChunkWriter", "OutcomeLedger", "decode_routing", "encode_record",
           "failure_record", "outcome_of", "read_chunk", "rejection_record"]

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_B64_PIECE = 3 << 20  # raw bytes per base64 piece: a multiple of 3, so pieces join exactly
_TAIL = b'"data":""}}}'  # how a record whose routing is written in pieces ends

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sample_dict(sample: WireSample | RoutedSample) -> dict[str, Any]:
    d: dict[str, Any] = {
        "tokens": np.asarray(sample.tokens),
        "prompt_len": int(sample.prompt_len),
        "routed_start": int(sample.routed_start),
        "group_id": sample.group_id,
        "policy_version": sample.policy_version,
        "engine": sample.engine,
        "finish_reason": sample.finish_reason,
    }
    fault = getattr(sample, "fault", None)
    if fault is not None:
        d["fault"] = {"kind": fault.kind, "message": fault.message}
    # Marked rows as routing row indices; of a mask the checks refused, the report speaks.
    native = sample.native
    if (isinstance(native, np.ndarray) and native.dtype == np.bool_ and native.ndim == 1
            and native.any()):
        d["native"] = np.flatnonzero(native)
    routing = sample.routed if isinstance(sample, RoutedSample) else sample.routing
    if routing is not None:  # last: its data is written in pieces (encode_record)
        arr = np.ascontiguousarray(routing)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        d["routing"] = {
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "layers": "moe" if isinstance(sample, RoutedSample) else "wire",
            "data": arr,
        }
    return d


def rejection_record(report: CheckReport, sample: WireSample | RoutedSample | None,
                     note: str | None) -> dict[str, Any]:
    """The record of a rejected sample; its routing (if any) stays an array until
    :func:`encode_record` writes it."""
    rec: dict[str, Any] = {
        "outcome": "rejected",
        "sample_id": report.sample_id,
        "kinds": list(report.kinds),
        "message": report.message,
        "report": report.to_dict(),
        "time": _now(),
    }
    if note:
        rec["note"] = note
    if sample is not None:
        rec["sample"] = _sample_dict(sample)
    return rec


def failure_record(sample_id: str, error: BaseException | str,
                   kind: str = "request_failed") -> dict[str, Any]:
    etype = type(error).__name__ if isinstance(error, BaseException) else None
    return {
        "outcome": "failed",
        "sample_id": sample_id,
        "kinds": [kind],
        "message": f"sample {sample_id!r}: {etype + ': ' if etype else ''}{error}",
        "error_type": etype,
        "time": _now(),
    }


def outcome_of(record: dict[str, Any]) -> str:
    """The manifest outcome a record counts under: ``failed``, else ``rejected``."""
    return "failed" if record.get("outcome") == "failed" else "rejected"


def encode_record(record: dict[str, Any]) -> Iterator[bytes]:
    """One record as a JSON line, in pieces: a routing array is base64-encoded a few MiB at a
    time, so a record never exists whole in memory."""
    routing = (record.get("sample") or {}).get("routing")
    data = None if routing is None else routing.get("data")
    if not isinstance(data, np.ndarray):
        yield orjson.dumps(record, option=_JSON_OPTS) + b"\n"
        return
    head = orjson.dumps({**record, "sample": {**record["sample"],
                                              "routing": {**routing, "data": ""}}},
                        option=_JSON_OPTS)
    if not head.endswith(_TAIL):  # routing is the last key of sample, sample of the record
        raise AssertionError("quarantine record layout: routing data is not last")
    yield head[:-4]  # ... "data":"
    raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    for i in range(0, raw.nbytes, _B64_PIECE):
        yield pybase64.b64encode(raw[i:i + _B64_PIECE])
    yield head[-4:] + b"\n"  # "}}}


class ChunkWriter:
    """The open quarantine chunk: records are appended to a new object as they come (a local
    temp file, never a link, or an upload); :meth:`seal` publishes it under its name. Only each
    record's ``(sample_id, outcome, kinds)`` is kept, for the manifest's counts and index."""

    def __init__(self, store: Store, name: str) -> None:
        self.name = name
        self._file = store.create(name)
        self.entries: list[tuple[str, str, tuple[str, ...]]] = []

    @property
    def bytes(self) -> int:
        return self._file.size

    def write(self, record: dict[str, Any]) -> None:
        for piece in encode_record(record):
            self._file.write(piece)
        self._file.flush()  # on disk as it comes; a crash loses what the OS had not written
        self.entries.append((record["sample_id"], outcome_of(record),
                             tuple(record.get("kinds") or ())))

    def seal(self) -> tuple[int, int, str]:
        """Publish the chunk under its name (durably); ``(records, bytes, digest)``."""
        self._file.commit()
        return len(self.entries), self._file.size, self._file.hexdigest

    def abort(self) -> None:
        """Drop the unsealed chunk."""
        self._file.abort()


class OutcomeLedger:
    """Outcome counts of a directory with each sample id counted once: an id stored in a shard
    counts as ``stored`` (only), any other id under its latest record's outcome. Holds the id
    and outcome of each quarantined id not stored, no data."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"rejected": 0, "failed": 0}
        self._outcome: dict[str, str] = {}

    def record(self, sample_id: str, outcome: str, *, stored: bool) -> None:
        """A quarantine record (in listing order); ``stored``: the id is in a sealed shard."""
        if stored:
            return
        prev = self._outcome.get(sample_id)
        if prev is not None:
            self.counts[prev] -= 1
        self.counts[outcome] += 1
        self._outcome[sample_id] = outcome

    def counts_with(self, records: Iterable[tuple[str, str]],
                    stored: Callable[[str], bool]) -> dict[str, int]:
        """The counts once ``records`` (``(sample_id, outcome)``, not yet listed) are recorded
        too, without recording them; ``stored(sample_id)``: the id is in a sealed shard."""
        counts = dict(self.counts)
        latest: dict[str, str] = {}
        for sid, outcome in records:
            if stored(sid):
                continue
            prev = latest.get(sid) or self._outcome.get(sid)
            if prev is not None:
                counts[prev] -= 1
            counts[outcome] += 1
            latest[sid] = outcome
        return counts

    def outcome(self, sample_id: str) -> str | None:
        """The outcome ``sample_id`` counts under, if it is quarantined and not stored."""
        return self._outcome.get(sample_id)

    def stored(self, sample_id: str) -> None:
        """``sample_id`` is now in a sealed shard: its records no longer count."""
        prev = self._outcome.pop(sample_id, None)
        if prev is not None:
            self.counts[prev] -= 1


def read_chunk(store: Store, name: str, listed: QuarantineEntry | None = None
               ) -> Iterator[dict[str, Any]]:
    """The records of one chunk, read once; with ``listed`` (its manifest entry), its size
    and digest are checked first, on the bytes read. :class:`ShardError` naming the file and
    line on a bad one, or the file when it is not a regular file."""
    if listed is None:
        data = store.read(name)
    else:
        try:  # never more than listed: a longer object is refused, not read whole
            data = store.read(name, listed.bytes)
        except ShardError as e:
            if e.kind != "too_large":
                raise
            raise ShardError(f"{name}: longer than the {listed.bytes} bytes the manifest "
                             "lists", file=name, kind="size") from None
        check_listed(listed, len(data), object_digest(data, listed.algorithm))
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise ShardError(f"{name}: line {lineno} is not valid JSON: {e}", file=name) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("sample_id"), str):
            raise ShardError(f"{name}: line {lineno} is not a quarantine record", file=name)
        yield rec


def decode_routing(record: dict[str, Any]) -> np.ndarray | None:
    """The routing array a quarantine record carries, if any (a copy; never pickled);
    ``ValueError`` when the record's routing is malformed."""
    r = (record.get("sample") or {}).get("routing")
    if not r:
        return None
    try:
        dtype = np.dtype(r["dtype"])
        if dtype.kind not in "iu":
            raise ValueError(f"dtype {dtype} is not an integer type")
        raw = pybase64.b64decode(r["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in r["shape"]]).copy()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"quarantine record {record.get('sample_id')!r}: malformed routing: {e}") from None
