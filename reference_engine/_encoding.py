"""The engine side of SGLang's ``routed_experts`` field: base64 of little-endian int32 bytes."""

from __future__ import annotations

import numpy as np
import pybase64

__all__ = ["BOOTSTRAP_PORT", "decode_int32", "encode_int32", "splice"]

# The bootstrap_port a PD router adds to requests (SGLang's default disaggregation port).
BOOTSTRAP_PORT = 8998


def encode_int32(rows: np.ndarray) -> str:
    """``[rows, num_layers, top_k]`` ids -> base64 of raw little-endian int32, C order."""
    return pybase64.b64encode(np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode("ascii")


def decode_int32(value: str, num_layers: int, top_k: int) -> np.ndarray:
    """Inverse of :func:`encode_int32` (a read-only view of the decoded bytes)."""
    raw = pybase64.b64decode(value, validate=True)
    return np.frombuffer(raw, dtype="<i4").reshape(-1, num_layers, top_k)


def splice(prefill_value: str, decode_value: str) -> str:
    """SGLang's PD merge: prefill's bytes, then decode's bytes past prefill's length."""
    p = pybase64.b64decode(prefill_value, validate=True)
    d = pybase64.b64decode(decode_value, validate=True)
    return pybase64.b64encode(p + d[len(p):]).decode("ascii")
