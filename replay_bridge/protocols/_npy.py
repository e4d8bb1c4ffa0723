"""Read a ``.npy`` image (vLLM's routing encoding) without ever unpickling."""

from __future__ import annotations

import io
import math

import numpy as np
from numpy.lib import format as npy_format

_MAX_HEADER = 4096


def parse_npy(raw: bytes) -> np.ndarray:
    """The integer array in a ``.npy`` image: a read-only view, or a native-byte-order copy
    when the image is big-endian (values as the header's byte order says).

    Raises ``ValueError`` naming the problem for a bad magic, an unreadable header, a non-integer
    dtype (an object array would need unpickling: refused), or a byte count that does not match
    the declared shape.
    """
    if len(raw) < 10 or raw[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy image (bad magic)")
    fp = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, OverflowError) as e:
        raise ValueError(f"bad .npy header: {e}") from None
    if dtype.hasobject or dtype.kind not in "iu":
        what = "an object array (pickled)" if dtype.hasobject else f"dtype {dtype}"
        raise ValueError(f".npy holds {what}; routing must be an integer array")
    offset = fp.tell()
    count = math.prod(shape)
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy declares shape {shape} ({count * dtype.itemsize} bytes) but holds "
            f"{len(raw) - offset} bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if fortran:
        return arr.reshape(shape[::-1]).T
    return arr.reshape(shape)


def to_npy(arr: np.ndarray) -> bytes:
    """Encode an array as a ``.npy`` image (the engine side, for tests and the reference engine)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
