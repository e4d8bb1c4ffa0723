"""The Arrow schema of a shard: one row per sample, geometry in the schema metadata.

Routing is a flat ``list<uint8|uint16>`` column holding ``[rows, num_moe_layers, top_k]`` ids
row-major per sample, so all routing of a record batch is one contiguous values buffer.

Format 3 adds a last column, ``native`` (``list<bool>``, one value per routing row, null when
the sample has no marked row): rows the trainer routes with the router's own top-k. Format-2
shards (no such column) stay readable; their samples have ``native`` ``None``.
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
    "READ_VERSIONS",
    "check_schema",
    "geometry_from_schema",
    "list_parts",
    "routed_rows",
    "samples_from_batch",
    "schema_for",
    "to_record_batch",
    "upgrade_batch",
]

FORMAT_VERSION = 4
READ_VERSIONS = (2, 3, 4)
"""Shard formats this release reads (and writes: only :data:`FORMAT_VERSION`). Format 4 has
format 3's schema; its checksums changed (:mod:`._checksum`)."""
METADATA_KEY = "routing_replay"
LAYOUT = "routed: [rows, num_moe_layers, top_k] row-major, MoE layers only, engine order"

_COLUMNS = (
    "sample_id", "group_id", "policy_version", "tokens", "prompt_len", "routed_start",
    "routed", "logprobs", "engine", "finish_reason", "weight_versions",
)
NATIVE = pa.field("native", pa.list_(pa.bool_()))
"""The format-3 column: ``native`` rows of a sample (null when it has none)."""


def _columns(version: int) -> tuple[str, ...]:
    return _COLUMNS if version == 2 else (*_COLUMNS, NATIVE.name)


def _id_type(geometry: RoutingGeometry) -> pa.DataType:
    return pa.uint8() if geometry.id_dtype == np.uint8 else pa.uint16()


def schema_for(geometry: RoutingGeometry, version: int = FORMAT_VERSION) -> pa.Schema:
    """The schema of every shard of this geometry (metadata included), in format ``version``
    (one of :data:`READ_VERSIONS`; new shards are :data:`FORMAT_VERSION`)."""
    if version not in READ_VERSIONS:
        raise ValueError(f"no shard schema of format {version}; known: {READ_VERSIONS}")
    meta = {"format_version": version, **geometry.to_dict(), "layout": LAYOUT}
    schema = pa.schema(
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
    return schema.append(NATIVE) if version >= 3 else schema


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
    known = version if version in READ_VERSIONS else FORMAT_VERSION
    if not projected:  # a reader that selected some columns sees only those
        missing = [c for c in _columns(known) if schema.get_field_index(c) < 0]
        if missing:
            raise ShardError(f"{where}: schema lacks columns {missing}", file=where)
    if known == 2 and schema.get_field_index(NATIVE.name) >= 0:
        raise ShardError(f"{where}: a format-2 schema with a {NATIVE.name!r} column (format 3 "
                         "added it)", file=where)
    expected = schema_for(geometry, known)
    for f in schema:
        i = expected.get_field_index(f.name)
        if i >= 0 and f.type != expected.field(i).type:
            raise ShardError(f"{where}: {f.name} column is {f.type}, expected "
                             f"{expected.field(i).type}", file=where)
    return geometry, version


def check_schema(schema: pa.Schema, name: str, geometry: RoutingGeometry, *,
                 version: int | None = None, projected: bool = False) -> None:
    """A shard's schema: a format this release reads (``version`` when given: the one its
    manifest says), that format's columns of the right types, ``geometry``."""
    got, found = geometry_from_schema(schema, name, projected=projected)
    if found not in READ_VERSIONS:
        raise ShardError(f"{name}: format_version {found}, expected one of "
                         f"{', '.join(map(str, READ_VERSIONS))}", file=name)
    if version is not None and found != version:
        raise ShardError(f"{name}: format_version {found}, its manifest says {version}",
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


def _marked(native: np.ndarray | None) -> bool:
    return native is not None and bool(native.any())


def to_record_batch(samples: Sequence[RoutedSample], geometry: RoutingGeometry,
                    schema: pa.Schema) -> pa.RecordBatch:
    """One record batch of samples (already checked against the geometry by the writer); a
    ``native`` column when ``schema`` has one (null for a sample without marked rows)."""
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
    if schema.get_field_index(NATIVE.name) >= 0:
        marked = [_marked(s.native) for s in samples]
        empty_b = np.empty(0, np.bool_)
        columns.append(_list_array([s.native if m else empty_b for s, m in zip(samples, marked)],
                                   np.dtype(np.bool_), mask=~np.array(marked, dtype=bool)))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def upgrade_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A format-2 record batch in ``schema`` (the current format's, :func:`schema_for`): its
    columns and a null ``native`` column (a batch that has one is returned as it is)."""
    if batch.schema.get_field_index(NATIVE.name) >= 0:
        return batch
    return pa.RecordBatch.from_arrays([*batch.columns, pa.nulls(batch.num_rows, NATIVE.type)],
                                      schema=schema)


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
    native = _native_rows(batch)
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
            native=None if native is None else native[i],
            routed=routed,
        ))
    return out


def _native_rows(batch: pa.RecordBatch) -> list[np.ndarray | None] | None:
    """Each row's ``native`` mask (``None`` where null or nothing is marked), or ``None`` when
    no row has one (format 2, or every value null)."""
    i = batch.schema.get_field_index(NATIVE.name)
    if i < 0:
        return None
    col = batch.column(i)
    if col.null_count == len(col):
        return None
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    out: list[np.ndarray | None] = []
    for j in range(len(col)):
        mask = values[offsets[j]:offsets[j + 1]] if valid[j] else None
        out.append(mask if mask is not None and mask.any() else None)
    return out
