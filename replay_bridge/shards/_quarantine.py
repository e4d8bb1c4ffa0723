"""Quarantine records: rejected samples (with their check report) and failed requests.

A record's ``outcome`` is ``rejected`` or ``failed`` and its ``kinds`` say why (the outcome and
kind vocabulary: ``docs/shards.md``, "Outcomes and verdict kinds").

Records are JSON objects, one per line, in ``quarantine-NNNNNN.jsonl`` chunks; each chunk is
written whole (temp file + rename) and listed in the manifest, so a crash never tears one.
Routing travels as base64 of its raw little-endian bytes, with dtype and shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64

from ..checks import CheckReport
from ..sample import RoutedSample, WireSample
from ._errors import ShardError

__all__ = ["decode_routing", "encode_records", "failure_record", "outcome_of", "read_chunk",
           "rejection_record"]

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


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
    routing = sample.routed if isinstance(sample, RoutedSample) else sample.routing
    if routing is not None:
        arr = np.ascontiguousarray(routing)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        d["routing"] = {
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "layers": "moe" if isinstance(sample, RoutedSample) else "wire",
            "data": pybase64.b64encode(arr.tobytes()).decode(),
        }
    fault = getattr(sample, "fault", None)
    if fault is not None:
        d["fault"] = {"kind": fault.kind, "message": fault.message}
    return d


def rejection_record(report: CheckReport, sample: WireSample | RoutedSample | None,
                     note: str | None) -> dict[str, Any]:
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


def encode_records(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r, option=_JSON_OPTS) + b"\n" for r in records)


def read_chunk(path: Path, name: str) -> Iterator[dict[str, Any]]:
    """The records of one chunk; :class:`ShardError` naming the file and line on a bad one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{name}: cannot read: {e.strerror or e}", file=name) from None
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
