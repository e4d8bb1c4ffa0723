"""Arrow IPC shards of checked samples: writer, reader, manifest.

A shard directory holds ``shard-NNNNNN.arrow`` (Arrow IPC file format, one row per sample),
``quarantine-NNNNNN.jsonl`` (rejected and failed samples) and ``manifest.json``. See
``docs/shards.md``.
"""

from ._errors import ShardError
from ._manifest import Manifest, QuarantineEntry, ShardEntry
from ._quarantine import decode_routing
from ._reader import ShardReader
from ._schema import FORMAT_VERSION, METADATA_KEY, schema_for
from ._writer import COMPRESSIONS, ShardStats, ShardWriter

__all__ = [
    "COMPRESSIONS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "Manifest",
    "QuarantineEntry",
    "ShardEntry",
    "ShardError",
    "ShardReader",
    "ShardStats",
    "ShardWriter",
    "decode_routing",
    "schema_for",
]
