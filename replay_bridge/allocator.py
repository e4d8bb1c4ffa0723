"""The C allocator's settings for the processes the bridge owns (its CLI, its ingest workers).

Every sample allocates a few MB of fresh buffers (decoded routing, narrowed ids, record
batches). glibc's defaults hand buffers of this size out as new memory maps and give freed
heap back to the kernel early, so the pages of each sample are faulted in (zeroed) again.
Serving buffers up to 32 MiB from the heap and keeping up to 128 MiB of freed heap made a
warm ``ingest`` 13-19 % faster on its wall clock and 10-16 % on its CPU, side by side
(docs/benchmarks.md). The settings are process-wide, so the library never makes them on its
own in a caller's process: only the CLI and the worker processes it starts do. A program of
one's own that ingests or collects in its process may call :func:`keep_freed_memory` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def keep_freed_memory() -> bool:
    """Set this process's glibc allocator to serve buffers up to :data:`MMAP_THRESHOLD` from
    the heap and keep up to :data:`TRIM_THRESHOLD` of freed heap; False (nothing changed)
    where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
