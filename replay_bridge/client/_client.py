"""The asyncio rollout client: send token ids, get back checked routed samples."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import CheckReport, accept, check_routed
from ..geometry import RoutingGeometry
from ..sample import RoutedSample, WireSample
from ..protocols import EngineCall, SamplingParams, decode_response, get_protocol
from ._http import DEFAULT_API_KEY_ENV, HTTPTransport
from ._transport import BaseTransport, RetryPolicy, TransportError
from ._prompts import Prompt, PromptError, sample_ids_for

__all__ = ["Exchange", "JoinError", "RolloutClient", "SampleResult", "join_turns"]


class JoinError(ValueError):
    """A continuation whose tokens or routing rows do not follow on from the earlier turn."""


@dataclass(slots=True)
class SampleResult:
    """What became of one sample, in the words of :data:`replay_bridge.sink.OUTCOMES`.

    ``outcome`` is ``"accepted"`` (passed every check, not stored yet: ``sample`` holds the
    checked :class:`RoutedSample`), ``"rejected"`` (``report`` says why; ``wire`` is what the
    engine sent) or ``"failed"`` (no usable answer after the retry budget; ``error`` holds the
    last error). A :class:`~replay_bridge.sink.SampleSink` turns it into a stored, rejected,
    duplicate or failed verdict.
    """

    sample_id: str
    outcome: str
    report: CheckReport | None = None
    sample: RoutedSample | None = None
    wire: WireSample | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the sample was accepted (``sample`` is set)."""
        return self.outcome == "accepted"

    @property
    def num_tokens(self) -> int:
        s = self.sample if self.sample is not None else self.wire
        return 0 if s is None else s.num_tokens


@dataclass(slots=True)
class Exchange:
    """One request and its raw answer (``body``: ``bytes``, or a ``memoryview`` of a buffer
    the transport pools, valid until :meth:`RolloutClient.recycle`), or the error that ended
    it."""

    call: EngineCall
    body: bytes | memoryview | None = None
    error: str | None = None
    group_id: str | None = None
    policy_version: int | None = None


class RolloutClient:
    """Generate rollouts from an inference engine and return each sample's routing, checked.

    ``engine`` is ``sglang`` (``/generate``), ``sglang-openai`` (``/v1/completions`` with
    ``sglext``) or ``vllm`` (``/v1/completions``). At most ``concurrency`` requests are in flight
    at once. Each request has a ``timeout`` (seconds, whole exchange) and is retried on
    connection errors, timeouts and 5xx answers (``retry``), never on 4xx. Answers larger
    than ``max_response_bytes`` are refused. When the environment variable ``api_key_env`` is
    set, its value is sent as a bearer token.

    ``transport`` replaces the HTTP transport those options build (they are then unused): any
    :class:`BaseTransport`, e.g. a :class:`MockTransport` answering from a function in tests;
    ``endpoint`` is then only a label.

    Use as ``async with RolloutClient(...) as client: results = await client.generate(p)``.
    """

    def __init__(
        self,
        endpoint: str,
        engine: str,
        geometry: RoutingGeometry,
        *,
        model: str | None = None,
        params: SamplingParams | None = None,
        concurrency: int = 64,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        max_response_bytes: int = 1 << 30,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        policy_version: int | None = None,
        transport: BaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.protocol = get_protocol(engine)
        self.engine = engine
        self.geometry = geometry
        self.model = model
        self.params = params or SamplingParams()
        self.concurrency = int(concurrency)
        self.policy_version = policy_version
        self.transport = transport if transport is not None else HTTPTransport(
            endpoint, timeout=timeout, retry=retry, max_response_bytes=max_response_bytes,
            api_key_env=api_key_env)
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"RolloutClient({self.transport!r}, engine={self.engine!r})"

    async def __aenter__(self) -> RolloutClient:
        await self.transport.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; the client can be opened again (on any event loop)."""
        await self.transport.close()
        self._slots = None

    @property
    def retries(self) -> int:
        """Retries made so far."""
        return self.transport.retries

    def calls_per_prompt(self, samples: int) -> int:
        """HTTP requests one prompt of ``samples`` samples takes."""
        return self.protocol.calls_per_prompt(samples)

    # ---- network half: raw answers -------------------------------------------------------

    async def fetch(
        self,
        prompt: Prompt,
        *,
        samples: int = 1,
        sample_ids: Sequence[str] | None = None,
        params: SamplingParams | None = None,
        routed_start: int = 0,
    ) -> list[Exchange]:
        """Send the requests for ``samples`` samples of ``prompt`` (or exactly ``sample_ids``)
        and return their raw answers; nothing is decoded.

        A request that fails for good, or whose transport raises anything unexpected, comes
        back as an :class:`Exchange` with ``error`` (secrets redacted), not as an exception."""
        ids = list(sample_ids) if sample_ids is not None else sample_ids_for(prompt.prompt_id,
                                                                              samples)
        try:
            calls = self.protocol.plan(prompt.input_ids, ids, params or self.params,
                                       model=self.model, routed_start=routed_start,
                                       messages=prompt.messages)
        except ValueError as e:
            raise PromptError(f"prompt {prompt.prompt_id!r}: {e}") from None
        version = prompt.policy_version if prompt.policy_version is not None \
            else self.policy_version
        return list(await asyncio.gather(*(self._send(c, prompt.prompt_id, version)
                                           for c in calls)))

    async def _send(self, call: EngineCall, group_id: str, version: int | None) -> Exchange:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            try:
                body = await self.transport.post_view(call.path, call.payload)
            except TransportError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a transport's surprise fails this request only
                error = f"{type(e).__name__} on POST {call.path}: {e}"
            else:
                return Exchange(call, body=body, group_id=group_id, policy_version=version)
        return Exchange(call, error=self.transport.redact(error), group_id=group_id,
                        policy_version=version)

    def recycle(self, exchanges: Sequence[Exchange]) -> None:
        """Give the exchanges' bodies back to the transport for reuse (after :meth:`finish`);
        their bodies are not to be read again. Decoded samples own their memory, so they stay
        valid."""
        for ex in exchanges:
            if ex.body is not None:
                self.transport.recycle(ex.body)

    # ---- CPU half: decode and check ------------------------------------------------------

    def finish(self, exchanges: Sequence[Exchange]) -> list[SampleResult]:
        """Decode and check raw answers: one result per sample id asked for, whatever the
        answers hold (a bad answer is a verdict for its own samples, never an exception)."""
        out: list[SampleResult] = []
        for ex in exchanges:
            out.extend(self._finish_one(ex))
        return out

    def _finish_one(self, ex: Exchange) -> list[SampleResult]:
        ids = ex.call.sample_ids
        if ex.body is None:
            return [SampleResult(sid, "failed", error=ex.error) for sid in ids]
        try:
            return self._decode_and_check(ex)
        except Exception as e:  # noqa: BLE001 - the last line of defence: never the run's end
            why = self.transport.redact(f"{type(e).__name__}: {e}")
            return [SampleResult(sid, "rejected", CheckReport(
                sid, kinds=("malformed",), message=f"sample {sid!r}: malformed: the answer to "
                f"{ex.call.path} could not be decoded or checked ({why})")) for sid in ids]

    def _decode_and_check(self, ex: Exchange) -> list[SampleResult]:
        ids = ex.call.sample_ids
        base = ids[0] if len(ids) == 1 else "_"
        wires = decode_response(self.engine, ex.call.payload, ex.body, self.geometry, base,
                                group_id=ex.group_id, policy_version=ex.policy_version)
        # Each sample says which of the asked-for ones it answers (its index); one that
        # answers none (a choice with a bad index) only explains the ones left unanswered.
        results: dict[str, SampleResult] = {}
        strays: list[WireSample] = []
        for ws in wires:
            if not 0 <= ws.index < len(ids):
                strays.append(ws)
                continue
            sid = ids[ws.index]
            if sid in results:
                continue
            ws.sample_id = sid
            report, routed = accept(ws, self.geometry)
            if routed is not None:
                results[sid] = SampleResult(sid, "accepted", report, routed)
            else:
                results[sid] = SampleResult(sid, "rejected", report, wire=ws)
        why = next((f"; {w.fault.message}" for w in strays if w.fault is not None), "")
        for sid in ids:
            if sid not in results:
                results[sid] = SampleResult(
                    sid, "failed",
                    error=f"sample {sid!r}: the answer to {ex.call.path} held {len(wires)} "
                          f"samples for {len(ids)} asked for; none for this one{why}")
        return [results[sid] for sid in ids]

    # ---- both ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        *,
        samples: int = 1,
        params: SamplingParams | None = None,
    ) -> list[SampleResult]:
        """``samples`` samples of ``prompt`` (a GRPO group when > 1), decoded and checked.

        Decoding and checking run on the calling thread; a rollout loop that wants them off
        the event loop calls :meth:`fetch` and runs :meth:`finish` in an executor.
        """
        exchanges = await self.fetch(prompt, samples=samples, params=params)
        try:
            return self.finish(exchanges)
        finally:
            self.recycle(exchanges)

    async def continue_sample(
        self,
        prev: RoutedSample,
        append_ids: Sequence[int],
        *,
        params: SamplingParams | None = None,
    ) -> SampleResult:
        """Continue a sample (multi-turn): send its tokens plus ``append_ids`` asking only for
        the rows not collected yet, and join the new rows to the earlier ones.

        The result's sample keeps ``prev``'s id, group, ``prompt_len`` and ``routed_start``;
        its report covers the new rows. A continuation that does not join up is ``rejected``
        with kind ``row_count`` and a message that says where.
        """
        tokens = np.asarray(prev.tokens).tolist()
        start = len(tokens) - 1
        prompt = Prompt(prev.group_id or prev.sample_id, tokens + list(append_ids),
                        prev.policy_version)
        exchanges = await self.fetch(prompt, sample_ids=[prev.sample_id], params=params,
                                     routed_start=start)
        try:
            (result,) = self.finish(exchanges)
        finally:
            self.recycle(exchanges)
        if result.sample is None:
            return result
        try:
            result.sample = join_turns(prev, result.sample)
        except JoinError as e:
            report = CheckReport(prev.sample_id, kinds=("row_count",), message=str(e),
                                 rows=result.sample.rows, expected_rows=result.sample.expected_rows)
            return SampleResult(prev.sample_id, "rejected", report)
        joined = check_routed(result.sample, self.geometry)
        if not joined.ok:
            return SampleResult(prev.sample_id, "rejected", joined)
        return result


def _completion_logprobs(s: RoutedSample) -> np.ndarray:
    n = s.completion_len
    lp = s.logprobs
    if lp is None or lp.shape[0] != n:
        return np.full(n, np.nan, np.float32)
    return np.asarray(lp, np.float32)


def join_turns(prev: RoutedSample, turn: RoutedSample) -> RoutedSample:
    """Append a later turn's rows to an earlier turn's: ``turn`` must extend ``prev``'s tokens
    and its first row must be the position right after ``prev``'s last row.

    Log-probs of the joined sample cover every token after ``prev.prompt_len``; tokens that
    were input in the later turn (not sampled) get NaN.
    """
    sid = prev.sample_id
    n_prev = prev.num_tokens
    if prev.rows != prev.expected_rows:
        raise JoinError(f"sample {sid!r}: the earlier turn has {prev.rows} rows, expected "
                        f"{prev.expected_rows}; it cannot be continued")
    if turn.num_tokens <= n_prev or not np.array_equal(
            np.asarray(turn.tokens[:n_prev]), np.asarray(prev.tokens)):
        raise JoinError(f"sample {sid!r}: the continuation's tokens do not start with the "
                        f"earlier turn's {n_prev} tokens")
    if turn.routed_start != prev.routed_start + prev.rows:
        raise JoinError(f"sample {sid!r}: the continuation's rows start at position "
                        f"{turn.routed_start}, the earlier turn's end at "
                        f"{prev.routed_start + prev.rows}")
    if turn.routed.shape[1:] != prev.routed.shape[1:]:
        raise JoinError(f"sample {sid!r}: the turns' routing blocks differ "
                        f"({prev.routed.shape[1:]} vs {turn.routed.shape[1:]})")
    appended = turn.prompt_len - n_prev
    logprobs = np.concatenate([_completion_logprobs(prev),
                               np.full(appended, np.nan, np.float32),
                               _completion_logprobs(turn)])
    versions: list[dict[str, Any]] | None = None
    if prev.weight_versions or turn.weight_versions:
        shift = turn.prompt_len - prev.prompt_len
        versions = list(prev.weight_versions or []) + [
            {**v, "start": v.get("start", 0) + shift, "end": v.get("end", 0) + shift}
            for v in (turn.weight_versions or [])]
    return RoutedSample(
        sample_id=sid,
        tokens=np.asarray(turn.tokens),
        prompt_len=prev.prompt_len,
        routed_start=prev.routed_start,
        group_id=prev.group_id,
        policy_version=turn.policy_version if turn.policy_version is not None
        else prev.policy_version,
        logprobs=logprobs,
        engine=turn.engine,
        finish_reason=turn.finish_reason,
        weight_versions=versions,
        routed=np.concatenate([prev.routed, turn.routed]),
    )
