"""routing-replay-bridge: carry MoE routing from RL rollouts to the trainer.

The public surface; everything else lives in private modules behind it.
"""

from .adapters import (AdaptedBatch, RoutingRejected, accept_batch, from_padded_batch,
                       from_sample_arrays, merge_prefill_decode)
from .checks import KINDS, CheckReport, CheckTally, accept, check_routed, check_sample
from .geometry import GeometryError, GeometryMismatch, RoutingGeometry
from .sample import DecodeFault, RoutedSample, WireSample
from .shards import (DuplicateSample, ShardError, ShardReader, ShardWriter,
                     UnstorableSample)
from .sink import OUTCOMES, VERDICT_KINDS, SampleSink, Verdict
from .protocols import decode_response

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "OUTCOMES",
    "VERDICT_KINDS",
    "AdaptedBatch",
    "CheckReport",
    "CheckTally",
    "DecodeFault",
    "DuplicateSample",
    "GeometryError",
    "GeometryMismatch",
    "RoutedSample",
    "RoutingGeometry",
    "RoutingRejected",
    "SampleSink",
    "ShardError",
    "ShardReader",
    "ShardWriter",
    "UnstorableSample",
    "Verdict",
    "WireSample",
    "accept",
    "accept_batch",
    "check_routed",
    "check_sample",
    "decode_response",
    "from_padded_batch",
    "from_sample_arrays",
    "merge_prefill_decode",
]
