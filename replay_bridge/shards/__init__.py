"""Datasets of checked samples: Arrow IPC shards on any filesystem, many writers, readers that
read only what they ask for.

A dataset is a URI (a local path, ``file://``, ``s3://``, anything ``pyarrow.fs`` resolves).
Its top level holds only shards (``part-<writer>-<seq>.arrow``, Arrow IPC files that
``pyarrow.dataset`` and ``polars.scan_ipc`` read); ``_routing_replay/`` holds each writer's
manifest and compact index and the quarantine. Everything that knows the format lives here,
:func:`validate_dataset` (the offline re-check) and :func:`cleanup_dataset` included. See
``docs/shards.md``.
"""

from ._batches import from_record_batch, to_record_batch
from ._dataset import is_dataset
from ._errors import DuplicateSample, ShardError, UnstorableSample
from ._manifest import IndexEntry, Manifest, QuarantineEntry, ShardEntry
from ._quarantine import decode_routing
from ._reader import ShardReader
from ._schema import FORMAT_VERSION, METADATA_KEY, READ_VERSIONS, schema_for
from ._store import display_uri
from ._strays import CleanupReport, cleanup_dataset
from ._validate import (MAX_LISTED_SAMPLE_FAULTS, Fault, ValidationReport, validate_dataset,
                        validate_dir)
from ._writer import COMPRESSIONS, ShardStats, ShardWriter, new_writer_id

__all__ = [
    "COMPRESSIONS",
    "CleanupReport",
    "DuplicateSample",
    "FORMAT_VERSION",
    "Fault",
    "IndexEntry",
    "MAX_LISTED_SAMPLE_FAULTS",
    "METADATA_KEY",
    "Manifest",
    "QuarantineEntry",
    "READ_VERSIONS",
    "ShardEntry",
    "ShardError",
    "ShardReader",
    "ShardStats",
    "ShardWriter",
    "UnstorableSample",
    "ValidationReport",
    "cleanup_dataset",
    "decode_routing",
    "display_uri",
    "from_record_batch",
    "is_dataset",
    "new_writer_id",
    "schema_for",
    "to_record_batch",
    "validate_dataset",
    "validate_dir",
]
