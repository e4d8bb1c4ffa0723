"""In-memory hand-off: checked samples as Arrow record batches in Ray's object store, and a
routing source over them for :class:`trainer_hooks.megatron.RoutingReplay`. No disk.

A producer (a rollout actor) turns samples into one record batch of the shard schema with
:func:`handoff_batch` (every sample passes the same checks as ``collect``; one that fails
is refused, named) and puts it with :func:`put_samples`. A consumer (a trainer actor) builds a
:class:`HandoffSource` over the object refs: ``ray.get`` maps each batch from the object
store without a copy, the storage rules are checked on it (a batch that breaks one is refused,
naming the sample), and ``source[sample_id]`` is a :class:`~replay_bridge.sample.RoutedSample`
whose arrays are views of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from ..checks import accept, check_routed
from ..geometry import RoutingGeometry
from ..sample import RoutedSample, WireSample
from ..shards import ShardError, from_record_batch, to_record_batch

__all__ = ["HandoffError", "HandoffSource", "handoff_batch", "put_samples"]


class HandoffError(ValueError):
    """A sample or a record batch refused on the hand-off path; the message names the sample
    (``sample_id``) and the rule or check kinds."""

    def __init__(self, message: str, *, sample_id: str | None = None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


def handoff_batch(samples: Iterable[RoutedSample | WireSample],
                  geometry: RoutingGeometry) -> pa.RecordBatch:
    """One record batch of the shard schema holding ``samples``, after the checks ``collect``
    runs (:func:`replay_bridge.checks.accept` for a decoded :class:`WireSample`, the same block
    checks for a :class:`RoutedSample`) and the writer's storage rules. The first sample that
    fails either is a :class:`HandoffError` naming it; so is a repeated sample id."""
    checked: list[RoutedSample] = []
    seen: set[str] = set()
    for s in samples:
        if isinstance(s, WireSample):
            report, routed = accept(s, geometry)
        elif isinstance(s, RoutedSample):
            report, routed = check_routed(s, geometry), s
        else:
            raise TypeError(f"expected RoutedSample or WireSample, got {type(s).__name__}")
        if not report.ok or routed is None:
            raise HandoffError(f"refused: {report.message or f'sample {report.sample_id!r}: '}"
                               f"{'' if report.message else ', '.join(report.kinds)}",
                               sample_id=report.sample_id)
        if routed.sample_id in seen:
            raise HandoffError(f"sample {routed.sample_id!r} is given twice",
                               sample_id=routed.sample_id)
        seen.add(routed.sample_id)
        checked.append(routed)
    try:
        return to_record_batch(checked, geometry)
    except ValueError as e:  # UnstorableSample names the sample and the rule
        raise HandoffError(str(e), sample_id=getattr(e, "sample_id", None)) from None


def put_samples(samples: Iterable[RoutedSample | WireSample], geometry: RoutingGeometry) -> Any:
    """:func:`handoff_batch`, put in Ray's object store; returns its ``ObjectRef``."""
    import ray

    return ray.put(handoff_batch(samples, geometry))


class HandoffSource(Mapping[str, RoutedSample]):
    """``Mapping[str, RoutedSample]`` over record batches handed off through Ray: object refs
    (resolved with ``ray.get`` on first use, without a copy) or record batches. Usable as
    ``RoutingReplay(source=...)``.

    Each batch is checked when it is first resolved (schema, storage rules); a batch that breaks
    a rule is a :class:`HandoffError` naming the sample, and an id in two batches is refused.
    Pickling sends the refs (or batches), never decoded samples, so the source can be passed to
    another actor."""

    def __init__(self, items: Sequence[Any], geometry: RoutingGeometry) -> None:
        self.geometry = geometry
        self._items = list(items)
        self._batches: list[pa.RecordBatch | None] = [None] * len(self._items)
        self._samples: list[list[RoutedSample] | None] = [None] * len(self._items)
        self._where: dict[str, tuple[int, int]] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (HandoffSource, (self._items, self.geometry))

    # ---- Mapping -----------------------------------------------------------------------

    def __getitem__(self, sample_id: str) -> RoutedSample:
        b, row = self._index()[sample_id]
        return self._decoded(b)[row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index())

    def __len__(self) -> int:
        return len(self._index())

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index()

    # ---- batches -----------------------------------------------------------------------

    def batches(self) -> list[pa.RecordBatch]:
        """Every batch, resolved and checked (object-store memory, not copies)."""
        return [self._batch(i) for i in range(len(self._items))]

    def _batch(self, i: int) -> pa.RecordBatch:
        batch = self._batches[i]
        if batch is None:
            item = self._items[i]
            if not isinstance(item, pa.RecordBatch):
                import ray

                item = ray.get(item)
            if not isinstance(item, pa.RecordBatch):
                raise HandoffError(f"hand-off item {i} is a {type(item).__name__}, not a "
                                   "record batch")
            try:
                self._samples[i] = from_record_batch(item, self.geometry,
                                                     where=f"hand-off batch {i}")
            except ShardError as e:
                raise HandoffError(str(e)) from None
            batch = self._batches[i] = item
        return batch

    def _decoded(self, i: int) -> list[RoutedSample]:
        self._batch(i)
        samples = self._samples[i]
        assert samples is not None
        return samples

    def _index(self) -> dict[str, tuple[int, int]]:
        if self._where is None:
            where: dict[str, tuple[int, int]] = {}
            for i in range(len(self._items)):
                for row, s in enumerate(self._decoded(i)):
                    if s.sample_id in where:
                        raise HandoffError(f"sample {s.sample_id!r} is in hand-off batches "
                                           f"{where[s.sample_id][0]} and {i}",
                                           sample_id=s.sample_id)
                    where[s.sample_id] = (i, row)
            self._where = where
        return self._where
