"""The one error type of the shard layer."""

from __future__ import annotations

__all__ = ["ShardError"]


class ShardError(Exception):
    """A shard directory, manifest, shard or quarantine file that cannot be trusted or read.

    ``file`` names the offending file (relative to the shard directory) when there is one;
    ``kind`` says what is wrong with it (``missing``, ``size``, ``checksum``, ``unsafe_path``,
    ``unreadable``, ``geometry``, ``counts``, ``manifest``, ``duplicate_id``).
    """

    def __init__(self, message: str, *, file: str | None = None,
                 kind: str = "unreadable") -> None:
        super().__init__(message)
        self.file = file
        self.kind = kind
