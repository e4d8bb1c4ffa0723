"""Drive a collection: prompts in, every sample's outcome into a shard directory.

Memory stays bounded whatever the number of prompts: prompts are read lazily, at most
``concurrency`` requests are in flight, and finished answers wait in a queue of ``queue_size``
entries; a full queue stops new requests (backpressure). Decoding, checking and writing run on
one worker thread, off the event loop; the shard writer is only ever touched from there.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..checks import CheckReport, CheckTally
from ..shards import ShardError, ShardWriter
from ..sink import SampleSink, Verdict
from ._client import Exchange, RolloutClient, SampleResult
from ._prompts import Prompt, sample_ids_for

__all__ = ["CollectSummary", "collect"]


@dataclass
class CollectSummary:
    """Totals of one collection, and (when asked for) one verdict per sample in the form
    ``ingest --json`` prints (:meth:`replay_bridge.sink.Verdict.to_dict`),
    ``{"sample_id", "stored", "kinds", "outcome", "message"?}``: outcome ``stored``,
    ``rejected`` (kinds say why), ``duplicate`` (the id is stored already) or ``failed`` (no
    answer after the retry budget; the message is the last error). ``rejected`` counts the
    rejected and duplicate samples."""

    tally: CheckTally
    prompts: int = 0
    prompts_skipped: int = 0
    samples: int = 0
    stored: int = 0
    rejected: int = 0
    failed: int = 0
    tokens: int = 0
    tokens_stored: int = 0
    seconds: float = 0.0
    retries: int = 0
    verdicts: list[dict[str, Any]] | None = None
    peak_rss_bytes: int = 0
    first_rejected: list[dict[str, Any]] = field(default_factory=list)
    """The first (up to 20) verdicts of samples not stored."""

    @property
    def by_kind(self) -> dict[str, int]:
        """Rejected and duplicate samples per verdict kind (the tally's count; failed samples
        are counted in ``failed``)."""
        return dict(self.tally.by_kind)

    def totals(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "prompts_skipped": self.prompts_skipped,
            "samples": self.samples,
            "stored": self.stored,
            "rejected": self.rejected,
            "failed": self.failed,
            "tokens": self.tokens,
            "tokens_stored": self.tokens_stored,
            "by_kind": self.by_kind,
            "retries": self.retries,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples / self.seconds, 2) if self.seconds else None,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _peak_rss() -> int:
    """Peak resident memory of this process's own address space, in bytes.

    Linux's ``VmHWM`` starts afresh at exec; ``ru_maxrss`` does not (it keeps the high-water
    mark of the parent image that was forked), so it is only the fallback.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Store:
    """Hand each prompt's results to the sink and keep the summary (on the worker thread
    only)."""

    def __init__(self, client: RolloutClient, sink: SampleSink, summary: CollectSummary,
                 on_result: Callable[[CollectSummary, list[SampleResult]], None] | None) -> None:
        self.client, self.sink, self.summary, self.on_result = client, sink, summary, on_result

    def __call__(self, exchanges: list[Exchange]) -> None:
        try:
            results = self.client.finish(exchanges)
        finally:
            self.client.recycle(exchanges)
        s, sink = self.summary, self.sink
        for r in results:
            verdict = self._store(r)
            s.samples += 1
            s.tokens += r.num_tokens
            d = verdict.to_dict()
            if s.verdicts is not None:
                s.verdicts.append(d)
            if not verdict.stored and len(s.first_rejected) < 20:
                s.first_rejected.append(d)
        counts = sink.counts
        s.stored, s.failed = counts["stored"], counts["failed"]
        s.rejected = counts["rejected"] + counts["duplicate"]
        s.tokens_stored = sink.tokens_stored
        if self.on_result is not None:
            self.on_result(s, results)

    # A store that raises is a verdict for its sample, never the end of the run (a decoder or a
    # check that raises already is one: RolloutClient.finish); only the writer's own faults
    # (disk, directory) stop it.

    def _store(self, r: SampleResult) -> Verdict:
        sink = self.sink
        if r.outcome == "failed":
            return sink.add_failure(r.sample_id, r.error or "no answer")
        assert r.report is not None
        try:
            return sink.add_checked(r.report, r.sample, r.wire)
        except (OSError, ShardError):
            raise
        except Exception as e:  # noqa: BLE001
            why = self.client.transport.redact(f"{type(e).__name__}: {e}")
            report = CheckReport(r.sample_id, kinds=("unstorable",),
                                 message=f"sample {r.sample_id!r}: unstorable: {why}")
            return sink.add_checked(report, None, None)


async def collect(
    client: RolloutClient,
    prompts: Iterable[Prompt],
    writer: ShardWriter,
    *,
    samples_per_prompt: int = 1,
    routed_start: int = 0,
    queue_size: int | None = None,
    keep_verdicts: bool = False,
    on_result: Callable[[CollectSummary, list[SampleResult]], None] | None = None,
) -> CollectSummary:
    """Collect ``samples_per_prompt`` samples of every prompt into ``writer``.

    ``routed_start``: ask for routing from this token position on (at most the prompt's
    length); earlier positions are stored without routing and the trainer routes them natively.

    Sample ids already in ``writer.stored_ids`` (a resumed directory) are not asked for again;
    a prompt whose samples are all stored is skipped. Every other sample goes through one
    :class:`~replay_bridge.sink.SampleSink` and ends stored, rejected (quarantined with its
    report), duplicate (its id is stored already) or failed (recorded with its last error).
    A sample the client's checks accept but the writer refuses is rejected as ``unstorable``.
    A client and writer of different geometries are refused before anything is sent
    (:class:`~replay_bridge.geometry.GeometryMismatch`). The writer is flushed but not closed.
    ``on_result(summary, results)`` runs on the worker thread after each prompt's results are
    stored.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if routed_start < 0:
        raise ValueError(f"routed_start must be >= 0, got {routed_start}")
    writer.geometry.require_same(client.geometry, "the shard directory's and the client's "
                                 "geometries")
    sink = SampleSink(writer)
    summary = CollectSummary(tally=sink.tally, verdicts=[] if keep_verdicts else None)
    stored = writer.stored_ids
    loop = asyncio.get_running_loop()
    workers = max(1, math.ceil(client.concurrency / client.calls_per_prompt(samples_per_prompt)))
    queue: asyncio.Queue[list[Exchange] | None] = asyncio.Queue(maxsize=queue_size or workers)
    source: Iterator[Prompt] = iter(prompts)
    store = _Store(client, sink, summary, on_result)
    t0 = time.perf_counter()

    async def produce() -> None:
        for prompt in source:  # one event loop: next() is never entered twice at once
            summary.prompts += 1
            ids = [i for i in sample_ids_for(prompt.prompt_id, samples_per_prompt)
                   if i not in stored]
            if not ids:
                summary.prompts_skipped += 1
                continue
            start = min(routed_start, len(prompt.input_ids)) if prompt.input_ids else routed_start
            await queue.put(await client.fetch(prompt, sample_ids=ids, routed_start=start))

    async def consume(pool: ThreadPoolExecutor) -> None:
        while (item := await queue.get()) is not None:
            await loop.run_in_executor(pool, store, item)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-bridge-store") as pool:
        failing = True
        end: asyncio.Future[None] = loop.create_future()
        end.set_result(None)
        consumer = asyncio.ensure_future(consume(pool))
        producers = [asyncio.ensure_future(produce()) for _ in range(workers)]
        try:
            # A consumer that fails (disk full, ...) must stop the producers too.
            produced = asyncio.gather(*producers)
            await asyncio.wait([consumer, produced], return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()
                raise RuntimeError("the store worker stopped before the prompts ran out")
            produced.result()
            # The consumer may fail while the queue is full: never wait on the put alone.
            end = asyncio.ensure_future(queue.put(None))
            await asyncio.wait([consumer, end], return_when=asyncio.FIRST_COMPLETED)
            await consumer
            failing = False
        finally:
            for task in (*producers, consumer, end):
                task.cancel()
            await asyncio.gather(*producers, consumer, end, return_exceptions=True)
            # Seal what was stored so far, also when stopping on an error or a cancel.
            try:
                await loop.run_in_executor(pool, writer.flush)
            except Exception:
                if not failing:
                    raise
    summary.seconds = time.perf_counter() - t0
    summary.retries = client.retries
    summary.peak_rss_bytes = _peak_rss()
    return summary
