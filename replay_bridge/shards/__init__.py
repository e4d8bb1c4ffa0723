"""Arrow IPC shards of checked samples: writer, reader, manifest.

A shard directory holds ``shard-NNNNNN.arrow`` (Arrow IPC file format, one row per sample),
``quarantine-NNNNNN.jsonl`` (rejected and failed samples) and ``manifest.json``; everything that
knows the format lives here, :func:`validate_dir` (the offline re-check) included. See
``docs/shards.md``.
"""

from ._batches import from_record_batch, to_record_batch
from ._errors import DuplicateSample, ShardError, UnstorableSample
from ._manifest import Manifest, QuarantineEntry, ShardEntry
from ._quarantine import decode_routing
from ._reader import ShardReader
from ._schema import FORMAT_VERSION, METADATA_KEY, schema_for
from ._validate import MAX_LISTED_SAMPLE_FAULTS, Fault, ValidationReport, validate_dir
from ._writer import COMPRESSIONS, ShardStats, ShardWriter

__all__ = [
    "COMPRESSIONS",
    "DuplicateSample",
    "Fault",
    "MAX_LISTED_SAMPLE_FAULTS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "Manifest",
    "QuarantineEntry",
    "ShardEntry",
    "ShardError",
    "ShardReader",
    "ShardStats",
    "ShardWriter",
    "UnstorableSample",
    "ValidationReport",
    "decode_routing",
    "from_record_batch",
    "schema_for",
    "to_record_batch",
    "validate_dir",
]
