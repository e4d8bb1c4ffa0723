"""One collector worker: a :class:`~replay_bridge.client.RolloutClient` over its share of the
endpoints, the one-process :func:`~replay_bridge.client.collect` loop and its own
:class:`~replay_bridge.shards.ShardWriter` into the shared dataset.

The driver feeds chunks of prompts; the worker acknowledges a chunk once every sample of it is
*published* (the writer is flushed when a chunk's last prompt is stored), so a chunk the driver
holds no acknowledgement for may be given to another worker if this one dies: its published
samples are skipped there, the rest are collected. This class holds no Ray code; the driver
wraps it with ``ray.remote`` (a threaded actor: ``feed`` and ``poll`` run while the collect
thread works).
"""

from __future__ import annotations

import asyncio
import copy
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..client import (CollectSummary, Prompt, RolloutClient, SamplingParams, collect,
                      sample_ids_for)
from ..geometry import RoutingGeometry
from ..shards import ShardWriter
from ._transport import RoundRobinTransport

__all__ = ["Collector", "COUNTERS"]

COUNTERS = ("samples", "stored", "rejected", "failed", "tokens", "tokens_stored", "retries")
"""The counters of :class:`~replay_bridge.client.CollectSummary` a worker reports."""

_END = object()


class Collector:
    """A collector worker (see the module docstring). ``client_options``: ``engine``,
    ``model``, ``params`` (a :class:`SamplingParams`), ``concurrency``, ``timeout``,
    ``retry`` (a :class:`RetryPolicy`), ``max_response_bytes``, ``api_key_env``.
    ``writer_options``: keywords of :class:`ShardWriter` (``samples_per_shard``,
    ``compression``)."""

    def __init__(self, index: int, uri: str, geometry: dict[str, Any],
                 client_options: dict[str, Any], writer_options: dict[str, Any],
                 samples_per_prompt: int, keep_verdicts: bool, queue_prompts: int) -> None:
        self.index = index
        self.uri = uri
        self.geometry = RoutingGeometry.from_dict(geometry)
        self.client_options = client_options
        self.writer_options = writer_options
        self.samples_per_prompt = samples_per_prompt
        self.keep_verdicts = keep_verdicts
        self.queue_prompts = max(1, queue_prompts)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- the driver's calls ------------------------------------------------------------

    def start(self, endpoints: Sequence[str]) -> dict[str, Any]:
        """Open a writer on the dataset (``resume=True``: whatever any writer published is
        stored) and start collecting from ``endpoints``; one call per pass."""
        if self._thread is not None:
            raise RuntimeError("collector already started: finish() it first")
        self.writer = ShardWriter(self.uri, self.geometry, resume=True, **self.writer_options)
        o = dict(self.client_options)
        http = {k: o.pop(k) for k in ("timeout", "max_response_bytes", "api_key_env") if k in o}
        transport = RoundRobinTransport(list(endpoints), retry=o.pop("retry", None), **http)
        self.client = RolloutClient(
            endpoints[0], o.pop("engine"), self.geometry, model=o.pop("model", None),
            params=o.pop("params", None) or SamplingParams(),
            concurrency=o.pop("concurrency", 64), transport=transport)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.queue_prompts)
        self._pending: dict[str, int] = {}  # prompt id -> chunk id, prompts being collected
        self._left: dict[int, int] = {}  # chunk id -> prompts of it not stored yet
        self._chunk_skipped: dict[int, tuple[int, int]] = {}  # chunk id -> stored already
        self._acked: list[int] = []  # published chunks not reported yet
        self._skipped = [0, 0]  # of acknowledged chunks: prompts, samples stored already
        self._snapshot: dict[str, Any] | None = None
        self._verdicts: list[dict[str, Any]] = []
        self._sent_verdicts = 0
        self._summary: CollectSummary | None = None
        self._error: BaseException | None = None
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="replay-bridge-collector",
                                        daemon=True)
        self._thread.start()
        return {"worker": self.index, "writer_id": str(getattr(self.writer, "writer_id", "")),
                "host": socket.gethostname(), "endpoints": [transport.url("")]}

    def feed(self, chunk_id: int, prompts: list[Prompt]) -> dict[str, Any]:
        """Queue a chunk of prompts (blocks while the queue is full); a prompt whose samples
        are all stored already is skipped. Returns what :meth:`poll` returns."""
        g = self.samples_per_prompt
        todo = []
        skipped = skipped_samples = 0
        for p in prompts:
            ids = sample_ids_for(p.prompt_id, g)
            missing = [i for i in ids if i not in self.writer]
            skipped_samples += len(ids) - len(missing)
            if missing:
                todo.append(p)
            else:
                skipped += 1
        with self._lock:
            self._left[chunk_id] = len(todo)
            for p in todo:
                self._pending[p.prompt_id] = chunk_id
            self._chunk_skipped[chunk_id] = (skipped, skipped_samples)
            if not todo:
                self._ack(chunk_id)
        for p in todo:
            while True:
                self._raise_if_failed()
                try:
                    self._queue.put(p, timeout=0.2)
                    break
                except queue.Full:
                    continue
        return self.poll()

    def poll(self) -> dict[str, Any]:
        """Chunks published since the last call, the counts as of the last publish (every
        sample they count is published), and the verdicts published since the last call."""
        self._raise_if_failed()
        with self._lock:
            acked, self._acked = self._acked, []
            verdicts = self._verdicts[self._sent_verdicts:]
            self._sent_verdicts = len(self._verdicts)
            return {"worker": self.index, "acked": acked, "counts": self._counts(),
                    "tally": copy.deepcopy(self._snapshot["tally"]) if self._snapshot else None,
                    "first_rejected": list(self._snapshot["first_rejected"])
                    if self._snapshot else [], "verdicts": verdicts}

    def finish(self) -> dict[str, Any]:
        """End the pass: wait for every queued prompt, seal and close the writer. Returns
        :meth:`poll`'s answer with every chunk acknowledged, plus the writer's stats."""
        assert self._thread is not None
        while self._thread.is_alive():
            try:
                self._queue.put(_END, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._thread = None
        try:
            self.writer.close()
        except BaseException as e:  # noqa: BLE001
            self._error = self._error or e
        self._raise_if_failed()
        s = self._summary
        assert s is not None
        with self._lock:
            self._take_snapshot(s)
            for chunk in list(self._left):
                self._ack(chunk)
        out = self.poll()
        out["writer"] = self.writer.stats.to_dict()
        out["seconds"] = time.perf_counter() - self._t0
        return out

    # ---- the collect thread ------------------------------------------------------------

    def _prompts(self) -> Iterator[Prompt]:
        while (p := self._queue.get()) is not _END:
            yield p

    def _run(self) -> None:
        async def go() -> CollectSummary:
            async with self.client:
                return await collect(self.client, self._prompts(), self.writer,
                                     samples_per_prompt=self.samples_per_prompt,
                                     keep_verdicts=self.keep_verdicts,
                                     on_result=self._on_result)
        try:
            self._summary = asyncio.run(go())
        except BaseException as e:  # noqa: BLE001 - reported to the driver
            self._error = e

    def _on_result(self, s: CollectSummary, results: list[Any]) -> None:
        """After each prompt is stored (on the store thread, the only one touching the
        writer): a chunk whose last prompt this was is published (flush) and acknowledged."""
        if not results:
            return
        sid = results[0].sample_id
        pid = sid if self.samples_per_prompt == 1 else sid.rsplit("/", 1)[0]
        with self._lock:
            chunk = self._pending.pop(pid, None)
            if chunk is None:
                return
            self._left[chunk] -= 1
            if self._left[chunk]:
                return
        self.writer.flush()
        with self._lock:
            self._take_snapshot(s)
            for c in [c for c, n in self._left.items() if n == 0]:
                self._ack(c)

    # ---- internals (under the lock) ----------------------------------------------------

    def _take_snapshot(self, s: CollectSummary) -> None:
        counts = {k: getattr(s, k) for k in COUNTERS if k != "retries"}
        counts["retries"] = self.client.retries
        verdicts = s.verdicts or []
        self._verdicts.extend(verdicts[len(self._verdicts):])
        self._snapshot = {"counts": counts, "tally": copy.deepcopy(s.tally),
                          "first_rejected": list(s.first_rejected)}

    def _ack(self, chunk: int) -> None:
        self._left.pop(chunk, None)
        skipped, skipped_samples = self._chunk_skipped.pop(chunk, (0, 0))
        self._skipped[0] += skipped
        self._skipped[1] += skipped_samples
        self._acked.append(chunk)

    def _counts(self) -> dict[str, int]:
        counts = dict(self._snapshot["counts"]) if self._snapshot else dict.fromkeys(COUNTERS, 0)
        counts["prompts_skipped"], counts["samples_skipped"] = self._skipped
        return counts

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            why = self.client.transport.redact(f"{type(e).__name__}: {e}")
            raise RuntimeError(f"collector {self.index} stopped: {why}")
