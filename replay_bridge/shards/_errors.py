"""The errors of the shard layer: an untrustworthy directory, and a sample the writer refuses."""

from __future__ import annotations

__all__ = ["DuplicateSample", "ShardError", "UnstorableSample"]


class ShardError(Exception):
    """A dataset, manifest, index, shard or quarantine chunk that cannot be trusted or read.

    ``file`` names the offending object (relative to the dataset's root) when there is one;
    ``kind`` says what is wrong with it (``missing``, ``size``, ``checksum``, ``unsafe_path``,
    ``unreadable``, ``geometry``, ``counts``, ``manifest``, ``duplicate_id``, ``storage_rule``,
    ``uri``, ``index``, ``too_large``).
    """

    def __init__(self, message: str, *, file: str | None = None,
                 kind: str = "unreadable") -> None:
        super().__init__(message)
        self.file = file
        self.kind = kind


class DuplicateSample(ValueError):
    """:meth:`ShardWriter.add` refused a sample whose id the directory holds already (in a
    sealed shard or the open one). ``sample_id`` names it."""

    def __init__(self, message: str, *, sample_id: str) -> None:
        super().__init__(message)
        self.sample_id = sample_id


class UnstorableSample(ValueError):
    """:meth:`ShardWriter.add` refused a sample that does not fit the shard: routing shape or
    dtype, expert ids out of range, tokens, or row offsets. ``sample_id`` names it."""

    def __init__(self, message: str, *, sample_id: object) -> None:
        super().__init__(message)
        self.sample_id = sample_id
