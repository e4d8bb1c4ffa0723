"""The Arrow schema of a shard: one row per sample, geometry in the schema metadata.

Routing is a flat ``list<uint8|uint16>`` column holding ``[rows, num_moe_layers, top_k]`` ids
row-major per sample, so all routing of a record batch is one contiguous values buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from ..geometry import GeometryError, GeometryMismatch, RoutingGeometry
from ..sample import RoutedSample
from ._errors import ShardError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "check_schema",
    "geometry_from_schema",
    "list_parts",
    "routed_rows",
    "samples_from_batch",
    "schema_for",
    "to_record_batch",
]

FORMAT_VERSION = 2
METADATA_KEY = "routing_replay"
LAYOUT = "routed: [rows, num_moe_layers, top_k] row-major, MoE layers only, engine order"

_COLUMNS = (
    "sample_id", "group_id", "policy_version", "tokens", "prompt_len", "routed_start",
    "routed", "logprobs", "engine", "finish_reason", "weight_versions",
)


def _id_type(geometry: RoutingGeometry) -> pa.DataType:
    return pa.uint8() if geometry.id_dtype == np.uint8 else pa.uint16()


def schema_for(geometry: RoutingGeometry) -> pa.Schema:
    """The schema of every shard of this geometry (metadata included)."""
    meta = {"format_version": FORMAT_VERSION, **geometry.to_dict(), "layout": LAYOUT}
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("group_id", pa.string()),
            pa.field("policy_version", pa.int64()),
            pa.field("tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("prompt_len", pa.int32(), nullable=False),
            pa.field("routed_start", pa.int32(), nullable=False),
            pa.field("routed", pa.list_(_id_type(geometry)), nullable=False),
            pa.field("logprobs", pa.list_(pa.float32())),
            pa.field("engine", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("weight_versions", pa.string()),
        ],
        metadata={METADATA_KEY: orjson.dumps(meta).decode()},
    )


def geometry_from_schema(schema: pa.Schema, where: str, *, projected: bool = False
                         ) -> tuple[RoutingGeometry, int]:
    """Rebuild ``(geometry, format_version)`` from a shard's schema; :class:`ShardError`
    naming ``where`` when the metadata is absent or unusable."""
    raw = (schema.metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise ShardError(f"{where}: schema has no {METADATA_KEY!r} metadata", file=where)
    try:
        meta = orjson.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        geometry = RoutingGeometry.from_dict(meta)
        version = int(meta["format_version"])
    except (ValueError, KeyError, TypeError, GeometryError) as e:
        raise ShardError(f"{where}: bad {METADATA_KEY!r} schema metadata: {e}",
                         file=where) from None
    if not projected:  # a reader that selected some columns sees only those
        missing = [c for c in _COLUMNS if schema.get_field_index(c) < 0]
        if missing:
            raise ShardError(f"{where}: schema lacks columns {missing}", file=where)
    expected = schema_for(geometry)
    for f in schema:
        i = expected.get_field_index(f.name)
        if i >= 0 and f.type != expected.field(i).type:
            raise ShardError(f"{where}: {f.name} column is {f.type}, expected "
                             f"{expected.field(i).type}", file=where)
    return geometry, version


def check_schema(schema: pa.Schema, name: str, geometry: RoutingGeometry, *,
                 projected: bool = False) -> None:
    """A shard's schema: this format version, columns of the right types, ``geometry``."""
    got, version = geometry_from_schema(schema, name, projected=projected)
    if version != FORMAT_VERSION:
        raise ShardError(f"{name}: format_version {version}, expected {FORMAT_VERSION}",
                         file=name)
    try:
        geometry.require_same(got, f"{name} schema geometry and manifest geometry")
    except GeometryMismatch as e:
        raise ShardError(str(e), file=name, kind="geometry") from None


# ---- samples -> record batch --------------------------------------------------------------


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise ValueError("record batch exceeds 2**31 list values; write smaller batches")
    return out.astype(np.int32)


def _list_array(parts: Sequence[np.ndarray], dtype: np.dtype, mask: np.ndarray | None = None
                ) -> pa.ListArray:
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    values = np.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False) \
        if parts else np.empty(0, dtype)
    return pa.ListArray.from_arrays(
        pa.array(_offsets(lengths)), pa.array(values),
        mask=None if mask is None or not mask.any() else pa.array(mask),
    )


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def to_record_batch(samples: Sequence[RoutedSample], geometry: RoutingGeometry,
                    schema: pa.Schema) -> pa.RecordBatch:
    """One record batch of samples (already checked against the geometry by the writer)."""
    no_lp = np.fromiter((s.logprobs is None for s in samples), dtype=bool, count=len(samples))
    empty_f = np.empty(0, np.float32)
    columns = [
        pa.array([s.sample_id for s in samples], pa.string()),
        pa.array([s.group_id for s in samples], pa.string()),
        pa.array([s.policy_version for s in samples], pa.int64()),
        _list_array([s.tokens for s in samples], np.dtype(np.int32)),
        pa.array([s.prompt_len for s in samples], pa.int32()),
        pa.array([s.routed_start for s in samples], pa.int32()),
        _list_array([s.routed for s in samples], geometry.id_dtype),
        _list_array([empty_f if s.logprobs is None else np.asarray(s.logprobs) for s in samples],
                    np.dtype(np.float32), mask=no_lp),
        pa.array([s.engine for s in samples], pa.string()),
        pa.array([s.finish_reason for s in samples], pa.string()),
        pa.array([_json_or_none(s.weight_versions) for s in samples], pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# ---- record batch -> samples --------------------------------------------------------------


def list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of a list column as NumPy arrays; ``values`` is a zero-copy view
    of the batch's one contiguous values buffer, indexed by the absolute offsets."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=True)
    return offsets, values


def routed_rows(values: np.ndarray, a: int, b: int, geometry: RoutingGeometry, where: str,
                sample_id: object) -> np.ndarray:
    """``values[a:b]`` as ``[rows, num_moe_layers, top_k]`` (a view); :class:`ShardError`
    naming ``where`` and the sample when it is not a whole number of rows."""
    m, k = geometry.num_moe_layers, geometry.top_k
    if (b - a) % (m * k):
        raise ShardError(f"{where}: sample {sample_id!r} has {b - a} routing ids, not a whole "
                         f"number of [{m}, {k}] rows", file=where)
    return values[a:b].reshape(-1, m, k)


def samples_from_batch(batch: pa.RecordBatch, geometry: RoutingGeometry, where: str
                       ) -> list[RoutedSample]:
    """Every row of a batch as a :class:`RoutedSample` (arrays are views of the batch);
    :class:`ShardError` naming ``where`` when a value breaks the schema's rules."""
    try:
        return _samples_from_batch(batch, geometry, where)
    except (ValueError, TypeError, KeyError, pa.ArrowException) as e:
        raise ShardError(f"{where}: malformed row: {type(e).__name__}: {e}", file=where) from None


def _samples_from_batch(batch: pa.RecordBatch, geometry: RoutingGeometry, where: str
                        ) -> list[RoutedSample]:
    n = batch.num_rows
    ids = batch.column("sample_id").to_pylist()
    groups = batch.column("group_id").to_pylist()
    versions = batch.column("policy_version").to_pylist()
    prompt = batch.column("prompt_len").to_numpy(zero_copy_only=False)
    start = batch.column("routed_start").to_numpy(zero_copy_only=False)
    engines = batch.column("engine").to_pylist()
    finish = batch.column("finish_reason").to_pylist()
    wv = batch.column("weight_versions").to_pylist()
    t_off, t_val = list_parts(batch.column("tokens"))
    r_off, r_val = list_parts(batch.column("routed"))
    lp_col = batch.column("logprobs")
    lp_off, lp_val = list_parts(lp_col)
    lp_valid = lp_col.is_valid().to_numpy(zero_copy_only=False)
    out = []
    for i in range(n):
        routed = routed_rows(r_val, int(r_off[i]), int(r_off[i + 1]), geometry, where, ids[i])
        out.append(RoutedSample(
            sample_id=ids[i],
            tokens=t_val[t_off[i]:t_off[i + 1]],
            prompt_len=int(prompt[i]),
            routed_start=int(start[i]),
            group_id=groups[i],
            policy_version=versions[i],
            logprobs=lp_val[lp_off[i]:lp_off[i + 1]] if lp_valid[i] else None,
            engine=engines[i],
            finish_reason=finish[i],
            weight_versions=None if wv[i] is None else orjson.loads(wv[i]),
            routed=routed,
        ))
    return out
