"""Checked samples <-> Arrow record batches in the shard schema, for hand-offs without files
(an object store of a cluster engine, an in-process queue)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from ..geometry import RoutingGeometry
from ..sample import RoutedSample, with_routing
from ._errors import ShardError
from ._rules import batch_breaks, conform
from ._schema import READ_VERSIONS, samples_from_batch, schema_for
from ._schema import to_record_batch as _to_batch

__all__ = ["from_record_batch", "to_record_batch"]


def to_record_batch(samples: Sequence[RoutedSample], geometry: RoutingGeometry
                    ) -> pa.RecordBatch:
    """One record batch (the shard schema, geometry in its metadata) of ``samples``.

    Every sample must pass the storage rules a :class:`ShardWriter` applies; the first one
    that does not is an :class:`UnstorableSample` naming it and the rule."""
    fitted = []
    for s in samples:
        routed = conform(s, geometry)  # UnstorableSample naming the sample and the rule
        fitted.append(s if routed is s.routed else with_routing(s, routed))
    return _to_batch(fitted, geometry, schema_for(geometry))


def from_record_batch(batch: pa.RecordBatch, geometry: RoutingGeometry,
                      where: str = "record batch") -> list[RoutedSample]:
    """The samples of a record batch in the shard schema (formats 3 and 4, or format 2: ``native``
    ``None``); :class:`ShardError` naming the row and the storage rule when one breaks it
    (arrays are views of the batch)."""
    try:
        if not any(batch.schema.equals(schema_for(geometry, v), check_metadata=False)
                   for v in READ_VERSIONS):
            raise ShardError(f"{where}: schema {batch.schema} is not the shard schema of "
                             f"{geometry.describe()}", file=where)
        breaks = batch_breaks(batch, geometry)
    except (pa.ArrowException, KeyError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{where}: unreadable record batch ({e})", file=where) from None
    if breaks:
        b = breaks[0]
        raise ShardError(f"{where}: {b.message} (row {b.row}, storage rule {b.rule!r})",
                         file=where, kind="unreadable" if b.unreadable else "storage_rule")
    return samples_from_batch(batch, geometry, where)
