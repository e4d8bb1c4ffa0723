"""The one way samples enter a shard directory: check, then store or quarantine, then a verdict.

``ingest`` (dumped traffic) and ``collect`` (live rollouts) hand every sample to a
:class:`SampleSink`, and so does any other writer of samples::

    with ShardWriter(out, geometry) as writer, SampleSink(writer) as sink:
        verdict = sink.add(wire_sample)          # checks.accept, then store or quarantine
        verdict = sink.add_failure("s7", error)  # no answer from the engine

A sample ends as exactly one outcome of :data:`OUTCOMES`; a sample that is not stored carries
the kinds of :data:`VERDICT_KINDS` that say why. Duplicates are found by asking the writer
(``sample_id in writer``), and a sample the writer refuses for any other reason
(:class:`~replay_bridge.shards.UnstorableSample`) is quarantined as ``unstorable`` with the
writer's message.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Protocol

from .checks import CheckReport, CheckTally, accept
from .sample import RoutedSample, WireSample
from .shards import ShardWriter, UnstorableSample

__all__ = ["OUTCOMES", "VERDICT_KINDS", "RunClaims", "SampleSink", "Verdict"]

OUTCOMES: Mapping[str, str] = MappingProxyType({
    "stored": "passed every check and is in a shard (listed once its shard is sealed)",
    "rejected": "failed a check, or the writer refused it (kind unstorable); quarantined with "
                "its kinds, message and data as received",
    "duplicate": "its sample id is stored in the directory already (sealed or pending); "
                 "nothing is written and the stored copy stays",
    "failed": "no usable answer from the engine (kind request_failed); quarantined with the "
              "last error",
    "accepted": "passed every check, not stored yet: a RolloutClient SampleResult before a "
                "sink stores it (never a sink verdict)",
})
"""Every outcome a sample can have, with its meaning. A :class:`SampleSink` verdict is one of
stored / rejected / duplicate / failed; the manifest counts the three that write something
(stored, rejected, failed)."""

VERDICT_KINDS: Mapping[str, str] = MappingProxyType({
    # checks.KINDS, in their order (the rules: replay_bridge.checks)
    "malformed": "the routing, or the line or response around it, could not be decoded",
    "missing_routing": "the response carried no routing",
    "shape": "the routing's layer or top-k axis disagrees with the geometry",
    "row_count": "rows != tokens - 1 - routed_start",
    "out_of_range": "an expert id outside [0, num_experts)",
    "all_zero": "every id of a (token, MoE layer) block is 0: a capture that never happened",
    "duplicate_ids": "a (token, MoE layer) block whose k ids are not k distinct experts",
    # the sink's own
    "unstorable": "passed the checks, but the shard writer refused it (routing shape, dtype "
                  "or ids, tokens or row offsets that do not fit the directory's geometry)",
    "duplicate_sample_id": "the sample id was stored in the directory earlier in this run",
    "already_stored": "the sample id was stored by an earlier run into this directory (a "
                      "resumed or repeated ingest): expected on a rerun, not a fault",
    "request_failed": "no answer for the sample: transport errors past the retry budget, or an "
                      "answer that did not hold it",
})
"""Every kind a verdict or quarantine record can carry, with its meaning: the check kinds
(``checks.KINDS``), then ``unstorable`` (outcome rejected), ``duplicate_sample_id`` and
``already_stored`` (outcome duplicate) and ``request_failed`` (outcome failed). Every verdict
but ``stored`` and ``already_stored`` is a fault of the run (exit code 1)."""

_SINK_OUTCOMES = ("stored", "rejected", "duplicate", "failed")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one sample: an ``outcome`` of :data:`OUTCOMES`, the ``kinds`` of
    :data:`VERDICT_KINDS` that say why it was not stored, the ``message`` naming sample,
    position and rule."""

    sample_id: str
    outcome: str
    kinds: tuple[str, ...] = ()
    message: str = ""

    @property
    def stored(self) -> bool:
        return self.outcome == "stored"

    def to_dict(self) -> dict[str, Any]:
        """The form ``ingest --json`` and ``collect --json`` print:
        ``{"sample_id", "stored", "kinds", "outcome", "message"?}`` (a message when not
        stored)."""
        d: dict[str, Any] = {"sample_id": self.sample_id, "stored": self.stored,
                             "kinds": list(self.kinds), "outcome": self.outcome}
        if not self.stored:
            d["message"] = self.message
        return d


class RunClaims(Protocol):
    """The sample ids of one run that several writers share (``ingest`` with ``workers``):
    a sink stores a sample only once its id is claimed here, so no two writers of the run
    store the same id."""

    def claim(self, sample_id: str) -> bool:
        """Take ``sample_id`` for this writer; False when another writer of the run has it."""
        ...

    def release(self, sample_id: str) -> None:
        """Give back an id this writer claimed but did not store."""
        ...


class _WriterThread:
    """Runs writer calls on their own thread, fed through a bounded queue, so that
    compression, hashing and disk writes overlap decoding and checking (both release the GIL).

    An error on the thread is raised on the caller's next ``submit`` or at ``close``.
    """

    _STOP = object()

    def __init__(self, depth: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue
            method, args = item
            try:
                method(*args)
            except BaseException as e:  # surfaced on the caller's thread
                self._error = e

    def submit(self, method: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((method, args))

    def close(self) -> None:
        self._q.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error


class SampleSink:
    """Check each sample, store it in ``writer`` or quarantine it there, and return its
    :class:`Verdict`; ``tally`` (the check table), ``counts`` (verdicts per outcome) and
    ``tokens_stored`` add up every verdict.

    With ``background=True`` the writer's appends, quarantine records and failures run on a
    thread of their own (a queue of ``depth`` calls), so compression and hashing overlap the
    caller's decoding and checking; ids are still claimed on the caller's thread, so each
    verdict is final when returned. An error of that thread is raised by the next ``add`` or by
    :meth:`close`. Use the sink from one thread, and close it (or leave its ``with`` block)
    before flushing or closing the writer. Closing the sink does not close the writer.

    ``claims`` is given when other writers store the same run's samples (:class:`RunClaims`):
    an id one of them claimed is a ``duplicate_sample_id`` here too.
    """

    def __init__(self, writer: ShardWriter, *, background: bool = False,
                 depth: int = 16, claims: RunClaims | None = None) -> None:
        self.writer = writer
        self._claims = claims
        self.geometry = writer.geometry
        self.tally = CheckTally(writer.geometry)
        self.counts: dict[str, int] = dict.fromkeys(_SINK_OUTCOMES, 0)
        self.tokens_stored = 0
        self._thread = _WriterThread(depth) if background else None

    # ---- entry points --------------------------------------------------------------------

    def add(self, sample: WireSample) -> Verdict:
        """Check a decoded sample (:func:`~replay_bridge.checks.accept`, against the writer's
        geometry), then store or quarantine it."""
        report, routed = accept(sample, self.geometry)
        return self.add_checked(report, routed, sample)

    def add_checked(self, report: CheckReport, routed: RoutedSample | None,
                    wire: WireSample | None = None) -> Verdict:
        """Store or quarantine a sample already checked: ``routed`` is what ``accept`` made of
        it (``None`` when ``report`` rejects it); ``wire`` is what the engine sent, kept in the
        quarantine record."""
        sid = report.sample_id
        if routed is None:
            self._call(self.writer.quarantine, report, wire)
            return self._verdict(report, "rejected")
        if sid in self.writer:
            if self.writer.stored_earlier(sid):
                dup = CheckReport(sid, kinds=("already_stored",),
                                  message=f"sample {sid!r}: already_stored: an earlier run "
                                          "stored it in this shard directory; kept as it is")
            else:
                dup = CheckReport(sid, kinds=("duplicate_sample_id",),
                                  message=f"sample {sid!r}: duplicate_sample_id: stored "
                                          "earlier in this run; the stored copy is kept")
            return self._verdict(dup, "duplicate")
        if self._claims is not None and not self._claims.claim(sid):
            dup = CheckReport(sid, kinds=("duplicate_sample_id",),
                              message=f"sample {sid!r}: duplicate_sample_id: another "
                                      "worker of this run stored it; its copy is kept")
            return self._verdict(dup, "duplicate")
        try:
            claimed = self.writer.claim(routed)
        except UnstorableSample as e:
            if self._claims is not None:
                self._claims.release(sid)
            refused = CheckReport(sid, kinds=("unstorable",), message=str(e), rows=routed.rows,
                                  expected_rows=routed.expected_rows)
            self._call(self.writer.quarantine, refused, wire if wire is not None else routed)
            return self._verdict(refused, "rejected")
        self._call(self.writer.append, claimed)
        self.tokens_stored += claimed.num_tokens
        return self._verdict(report, "stored")

    def add_failure(self, sample_id: str, error: BaseException | str) -> Verdict:
        """Record a sample the engine never answered (kind ``request_failed``)."""
        self._call(self.writer.record_failure, sample_id, error, "request_failed")
        self.counts["failed"] += 1
        return Verdict(sample_id, "failed", ("request_failed",), str(error))

    @property
    def faults(self) -> int:
        """Verdicts that are faults of this run: rejected, failed, and duplicates of ids this
        run stored (``already_stored`` is what a rerun expects, not a fault)."""
        c = self.counts
        return (c["rejected"] + c["failed"] + c["duplicate"]
                - self.tally.by_kind.get("already_stored", 0))

    def close(self) -> None:
        """Wait for the background thread's queued calls; raise its error, if any."""
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.close()

    def __enter__(self) -> SampleSink:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the original exception is the one to report
            pass

    # ---- internals -----------------------------------------------------------------------

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        if self._thread is None:
            method(*args)
        else:
            self._thread.submit(method, *args)

    def _verdict(self, report: CheckReport, outcome: str) -> Verdict:
        self.tally.add(report)
        self.counts[outcome] += 1
        return Verdict(report.sample_id, outcome, report.kinds, report.message)
