"""The compact index a writer publishes with its manifest: one row per sample id it stored or
quarantined, enough to find a sample's record batch without opening any shard.

Stored rows say where the sample is (shard, record batch, row), the byte range of that record
batch's IPC message in the shard with its checksum (XXH3-64 from format 4, CRC-32 before; the
column is named after it), so a reader fetches and checks exactly that range, and what a loader
plans with (group, token count, prompt length, first routed row).
Quarantined rows carry the id's latest outcome and kinds (so a resumed writer need not read
the quarantine).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ._checksum import checksums_for
from ._errors import ShardError
from ._schema import FORMAT_VERSION

__all__ = ["INDEX_SCHEMA", "LOADED_SCHEMA", "OUTCOME_CODES", "index_bytes", "index_schema",
           "parse_index", "quarantine_rows", "stored_rows"]

OUTCOME_CODES = {"stored": 0, "rejected": 1, "failed": 2}


def index_schema(version: int) -> pa.Schema:
    """The index of format ``version``: its block checksum column is named after the
    algorithm (``xxh3_64`` uint64 from format 4, ``crc32`` uint32 before)."""
    c = checksums_for(version)
    return LOADED_SCHEMA.set(_CHECKSUM, pa.field(c.block_algorithm, c.block_type,
                                                 nullable=False))


LOADED_SCHEMA = pa.schema([  # what parse_index returns, for every format
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("outcome", pa.int8(), nullable=False),
    pa.field("kinds", pa.string()),
    pa.field("group_id", pa.string()),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("batch", pa.int32(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
    pa.field("checksum", pa.uint64(), nullable=False),
    pa.field("tokens", pa.int32(), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
    pa.field("routed_start", pa.int32(), nullable=False),
])
_CHECKSUM = LOADED_SCHEMA.get_field_index("checksum")
INDEX_SCHEMA = index_schema(FORMAT_VERSION)
"""What a writer of this release writes."""
_CHECKSUM_TYPE = INDEX_SCHEMA.field(_CHECKSUM).type


def stored_rows(batch: pa.RecordBatch, shard: int, batch_no: int,
                block: tuple[int, int, int]) -> pa.Table:
    """Index rows of one written record batch (``block``: offset, length, checksum)."""
    n = batch.num_rows
    offsets = batch.column("tokens").offsets.to_numpy()
    full = lambda v, t: pa.array(np.full(n, v, dtype=t))  # noqa: E731
    return pa.table([
        batch.column("sample_id"),
        full(0, np.int8),
        pa.nulls(n, pa.string()),
        batch.column("group_id"),
        full(shard, np.int32), full(batch_no, np.int32),
        pa.array(np.arange(n, dtype=np.int32)),
        full(block[0], np.int64), full(block[1], np.int64),
        pa.array(np.full(n, block[2], np.uint64), _CHECKSUM_TYPE),
        pa.array(np.diff(offsets).astype(np.int32)),
        batch.column("prompt_len"), batch.column("routed_start"),
    ], schema=INDEX_SCHEMA)


def quarantine_rows(entries: Sequence[tuple[str, str, tuple[str, ...]]]) -> pa.Table:
    """Index rows of quarantined ids: ``(sample_id, outcome, kinds)``, each id once."""
    n = len(entries)
    zeros = pa.array(np.zeros(n, np.int32))
    return pa.table([
        pa.array([e[0] for e in entries], pa.string()),
        pa.array(np.fromiter((OUTCOME_CODES[e[1]] for e in entries), np.int8, n)),
        pa.array([",".join(e[2]) for e in entries], pa.string()),
        pa.nulls(n, pa.string()),
        pa.array(np.full(n, -1, np.int32)), zeros, zeros,
        pa.array(np.zeros(n, np.int64)), pa.array(np.zeros(n, np.int64)),
        pa.array(np.zeros(n, np.uint64), _CHECKSUM_TYPE), zeros, zeros, zeros,
    ], schema=INDEX_SCHEMA)


def index_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # lz4, not zstd: opening a dataset decodes every index; lz4 decodes 3x faster.
    with ipc.new_file(sink, table.schema,
                      options=ipc.IpcWriteOptions(compression=pa.Codec("lz4"))) as w:
        w.write_table(table.combine_chunks() if table.num_rows else table)
    return sink.getvalue().to_pybytes()


def parse_index(data: bytes, name: str, shards: int, rows: int, version: int) -> pa.Table:
    """An index object of format ``version``, checked: its schema, its row count, shard numbers
    in range. Its block checksums come back as a uint64 column named ``checksum`` whatever the
    format's algorithm, so indexes of every format concatenate."""
    try:
        table = ipc.open_file(pa.py_buffer(data)).read_all()
        table.validate(full=True)
    except (OSError, pa.ArrowException, ValueError) as e:  # Arrow's text may not be UTF-8
        raise ShardError(f"{name}: not a readable index ({type(e).__name__}: {e})",
                         file=name) from None
    if not table.schema.equals(index_schema(version), check_metadata=False):
        raise ShardError(f"{name}: index schema {table.schema} is not the format's", file=name)
    if table.num_rows != rows:
        raise ShardError(f"{name}: {table.num_rows} rows, the manifest says {rows}", file=name,
                         kind="counts")
    shard = table.column("shard").to_numpy()
    stored = table.column("outcome").to_numpy() == 0
    if ((shard[stored] < 0) | (shard[stored] >= shards)).any() or (shard[~stored] != -1).any():
        raise ShardError(f"{name}: names a shard the manifest does not list", file=name,
                         kind="counts")
    offset, length = table.column("offset").to_numpy(), table.column("length").to_numpy()
    if (offset[stored] < 0).any() or (length[stored] <= 0).any():
        raise ShardError(f"{name}: a record batch with a negative offset or no length",
                         file=name, kind="index")
    return table.set_column(_CHECKSUM, LOADED_SCHEMA.field(_CHECKSUM),
                            table.column(_CHECKSUM).cast(pa.uint64()))
