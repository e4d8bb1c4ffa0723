"""Routing as RL frameworks hold it in memory, into checked samples.

Engine answers reach the checks through :mod:`replay_bridge.protocols`; a framework that
already holds the routing (verl, slime, miles, NeMo-RL, tunix) hands its arrays here instead
and gets the same verdicts, without shards::

    batch = from_padded_batch(routed_experts, attention_mask, input_ids, prompt_lengths,
                              sample_ids, geometry)     # verl: [batch, seq, layers, k]
    batch.raise_for_rejects()                           # or log batch.tally.to_dict()
    samples = batch.accepted                            # RoutedSample, ready for the layout

- :func:`from_padded_batch`: one ``[batch, seq, layers, k]`` array aligned with
  ``input_ids [batch, seq]`` and an attention mask (left, right or both-side padding);
- :func:`from_sample_arrays`: one ``[tokens - 1 - routed_start, layers, k]`` array per sample;
- :func:`merge_prefill_decode`: prefill's prompt rows + decode's completion rows, for
  frameworks that talk to the prefill and decode workers themselves;
- :func:`accept_batch`: :func:`~replay_bridge.checks.accept` over many wire samples.

The layer axis may hold every hidden layer (``geometry.num_layers``) or the MoE layers only
(``geometry.num_moe_layers``); arrays may be NumPy arrays or torch tensors (read through
``.detach().cpu().numpy()``; torch is never imported). With ``mark`` (NeMo-RL and tunix mark a
row without routing ``-1``), a row whose every id in every MoE layer equals the mark becomes a
native row (:attr:`~replay_bridge.sample.WireSample.native`), which the trainer routes with the
router's own top-k; a row only partly marked is left as it is, and the checks reject it
(``out_of_range``). Without ``mark``, ``-1`` is ``out_of_range`` as from any engine; a zero row
is always ``all_zero``.

What the ids say is a verdict, as for an engine. A call whose arrays disagree with one another
or with the geometry (shapes, a hole in the attention mask, a prompt length outside its row,
token ids outside ``int32``) raises :class:`ValueError` naming the row: that is the caller's
bug, the same for every sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import CheckReport, CheckTally, accept
from .geometry import RoutingGeometry
from .sample import DecodeFault, RoutedSample, WireSample, field_problem

__all__ = [
    "AdaptedBatch",
    "RoutingRejected",
    "accept_batch",
    "from_padded_batch",
    "from_sample_arrays",
    "merge_prefill_decode",
]

_TOKEN_MAX = int(np.iinfo(np.int32).max)


class RoutingRejected(ValueError):
    """Samples of a batch failed the checks. ``reports`` holds their reports, ``total`` how
    many samples the batch had; the message names the first one's id, position, layer and
    rule."""

    def __init__(self, reports: Sequence[CheckReport], total: int) -> None:
        self.reports = list(reports)
        self.total = total
        first = self.reports[0].message if self.reports else "none"
        super().__init__(f"{len(self.reports)} of {total} samples rejected; first: {first}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.reports, self.total)


@dataclass
class AdaptedBatch:
    """The verdicts on a batch: ``reports[i]`` and ``samples[i]`` (``None`` when rejected)
    belong to input sample ``i``; ``tally`` totals the reports (``tally.to_dict()`` for a
    log line)."""

    reports: list[CheckReport]
    samples: list[RoutedSample | None]
    tally: CheckTally

    def __len__(self) -> int:
        return len(self.reports)

    @property
    def ok(self) -> bool:
        """Whether every sample passed."""
        return all(r.ok for r in self.reports)

    @property
    def accepted(self) -> list[RoutedSample]:
        """The samples that passed, in input order."""
        return [s for s in self.samples if s is not None]

    @property
    def rejected(self) -> list[CheckReport]:
        """The reports of the samples that failed, in input order."""
        return [r for r in self.reports if not r.ok]

    def raise_for_rejects(self) -> None:
        """Raise :class:`RoutingRejected` when a sample failed."""
        bad = self.rejected
        if bad:
            raise RoutingRejected(bad, len(self.reports))


def accept_batch(samples: Iterable[WireSample], geometry: RoutingGeometry) -> AdaptedBatch:
    """:func:`~replay_bridge.checks.accept` each sample, tallied."""
    tally = CheckTally(geometry)
    reports: list[CheckReport] = []
    routed: list[RoutedSample | None] = []
    for sample in samples:
        report, good = accept(sample, geometry)
        tally.add(report)
        reports.append(report)
        routed.append(good)
    return AdaptedBatch(reports, routed, tally)


# --------------------------------------------------------------------------------------------
# padded batches (verl)


def from_padded_batch(
    routing: Any,
    attention_mask: Any,
    input_ids: Any,
    prompt_lengths: Any,
    sample_ids: Sequence[str],
    geometry: RoutingGeometry,
    *,
    routed_start: Any = 0,
    group_ids: Sequence[str | None] | None = None,
    policy_version: int | Sequence[int | None] | None = None,
    logprobs: Any = None,
    mark: int | None = None,
    engine: str | None = None,
) -> AdaptedBatch:
    """Check a padded batch as verl keeps it.

    ``routing [batch, seq, layers, k]`` (any integer dtype) is aligned with
    ``input_ids [batch, seq]``: position ``t`` holds the routing of token ``t``. The valid
    tokens of row ``b`` are where ``attention_mask [batch, seq]`` is 1, one contiguous run
    (padding on either side or both); ``prompt_lengths[b]`` of them are its prompt. Each
    sample's routing rows are its valid positions ``routed_start .. n - 2`` (the last token's
    routing, and whatever sits at padded positions, is ignored).

    ``routed_start``, ``prompt_lengths`` and ``policy_version`` take one value per row or one
    for all; ``logprobs [batch, width]`` are the completion tokens' rollout log-probs, each
    row's first ``completion_len`` entries (verl's ``rollout_log_probs``, aligned with its
    right-padded ``responses``).
    """
    r = _array(routing)
    valid_in, ids = _array(attention_mask), _array(input_ids)
    if r.ndim != 4:
        raise ValueError(f"routing has shape {r.shape}, expected [batch, seq, layers, top_k]")
    batch, seq = r.shape[:2]
    for what, a in (("attention_mask", valid_in), ("input_ids", ids)):
        if a.shape != (batch, seq):
            raise ValueError(f"{what} has shape {a.shape}, routing {r.shape}: expected "
                             f"[batch, seq] = {(batch, seq)}")
    sids = _sample_ids(sample_ids, batch)
    _require_integer(r, "routing")
    moe_only = _layer_axis(r.shape[2], r.shape[3], geometry, "routing")
    mark = _mark(mark, geometry, r.dtype, "routing")

    if batch == 0:
        return accept_batch([], geometry)
    valid = _mask(valid_in)
    first, counts = _runs(valid, sids)
    prompt = _ints(prompt_lengths, batch, "prompt_lengths")
    start = _ints(routed_start, batch, "routed_start")
    _require_lengths(prompt, start, counts, sids)
    tokens = _tokens_of(ids, valid, sids)

    rows = np.maximum(counts - 1 - start, 0)
    col = np.arange(seq)
    take = (col >= (first + start)[:, None]) & (col < (first + counts - 1)[:, None])
    gathered = r[take]  # [sum(rows), layers, k], a copy: nothing aliases the caller's array
    native = _native_rows(gathered, moe_only, geometry, mark)
    wire = _to_wire(gathered, geometry) if moe_only else gathered

    cuts = np.cumsum(rows)[:-1]
    completion = counts - prompt
    lps = _padded_logprobs(logprobs, batch, completion)
    groups = _per_sample_fields(group_ids, batch, "group_id")
    versions = _versions(policy_version, batch)
    samples = [
        WireSample(
            sample_id=sids[b],
            tokens=tok,
            prompt_len=int(prompt[b]),
            routed_start=int(start[b]),
            group_id=groups[b],
            policy_version=versions[b],
            logprobs=lps[b],
            engine=engine,
            native=None if nat is None or not nat.any() else nat,
            routing=rows_b,
        )
        for b, (tok, rows_b, nat) in enumerate(zip(
            np.split(tokens, np.cumsum(counts)[:-1]), np.split(wire, cuts),
            np.split(native, cuts) if native is not None else [None] * batch))
    ]
    return accept_batch(samples, geometry)


# --------------------------------------------------------------------------------------------
# per-sample arrays (slime, miles)


def from_sample_arrays(
    routings: Sequence[Any],
    tokens: Sequence[Any],
    prompt_lengths: Any,
    sample_ids: Sequence[str],
    geometry: RoutingGeometry,
    *,
    routed_start: Any = 0,
    group_ids: Sequence[str | None] | None = None,
    policy_version: int | Sequence[int | None] | None = None,
    logprobs: Sequence[Any] | None = None,
    mark: int | None = None,
    engine: str | None = None,
) -> AdaptedBatch:
    """Check one routing array per sample, as slime and miles keep them.

    ``routings[i]`` is ``[len(tokens[i]) - 1 - routed_start, layers, k]``: row ``r`` is the
    routing of token position ``routed_start + r``; ``None`` when the sample has none
    (``missing_routing``). A sample's array of the wrong row count or shape is that sample's
    verdict (``row_count``, ``shape``), as for an engine answer. ``logprobs[i]`` (or ``None``)
    are the completion tokens' rollout log-probs.
    """
    n = len(sample_ids)
    sids = _sample_ids(sample_ids, n)
    for what, seq in (("routings", routings), ("tokens", tokens)):
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {what} for {n} sample ids")
    if logprobs is not None and len(logprobs) != n:
        raise ValueError(f"{len(logprobs)} logprobs for {n} sample ids")
    prompt = _ints(prompt_lengths, n, "prompt_lengths")
    start = _ints(routed_start, n, "routed_start")
    groups = _per_sample_fields(group_ids, n, "group_id")
    versions = _versions(policy_version, n)
    toks = [_sample_tokens(tokens[i], sids[i]) for i in range(n)]
    _require_lengths(prompt, start, np.array([t.size for t in toks], np.int64), sids)
    mark = _mark(mark, geometry, None, "routing")

    samples, sources = [], []
    for i in range(n):
        r = None if routings[i] is None else _array(routings[i])
        native = None
        if r is not None and r.ndim == 3 and _is_integer(r) and r.shape[2] == geometry.top_k \
                and r.shape[1] in (geometry.num_layers, geometry.num_moe_layers):
            moe_only = r.shape[1] != geometry.num_layers
            if mark is not None:
                _mark(mark, geometry, r.dtype, f"sample {sids[i]!r}'s routing")
                native = _native_rows(r, moe_only, geometry, mark)
            if moe_only:
                r = _to_wire(r, geometry)
        lp = None
        if logprobs is not None and logprobs[i] is not None:
            lp = np.array(_array(logprobs[i]), dtype=np.float32).reshape(-1)
        sources.append(r)
        samples.append(WireSample(
            sample_id=sids[i], tokens=toks[i], prompt_len=int(prompt[i]),
            routed_start=int(start[i]), group_id=groups[i], policy_version=versions[i],
            logprobs=lp, engine=engine,
            native=None if native is None or not native.any() else native,
            routing=r,
            fault=None if r is not None else DecodeFault(
                "missing_routing", "no routing array was given for this sample"),
        ))
    batch = accept_batch(samples, geometry)
    for routed, source in zip(batch.samples, sources):
        # A stored sample owns its ids: a framework may reuse its buffers (a CPU tensor's
        # .numpy() is the tensor's memory).
        if routed is not None and source is not None and np.may_share_memory(routed.routed,
                                                                              source):
            routed.routed = routed.routed.copy()
    return batch


# --------------------------------------------------------------------------------------------
# prefill/decode disaggregation


def merge_prefill_decode(prefill: WireSample, decode: WireSample | None) -> WireSample:
    """One sample from a prefill worker's and a decode worker's answers to one request.

    The merge takes prefill's rows (its prompt positions ``routed_start .. prompt_len - 1``,
    exactly ``prompt_len - routed_start`` rows) and decode's completion rows (positions
    ``prompt_len .. n - 2``); decode's routing may cover every row (its prompt rows are junk
    and ignored), the completion rows only, or be absent (decoded without routing) when the
    first token finished the request, which is valid only when there is no completion row to
    take. Tokens, log-probs and the other fields are decode's (the request's answer); with
    ``decode`` ``None`` the sample is prefill's answer (the prompt and the first token).

    Never raises on what the workers sent: inconsistent answers give a sample whose ``fault``
    names the rule (``malformed``: different ids, prompts, offsets or tokens, or a worker's
    own decode fault; ``row_count``: a worker's row count fits no rule above;
    ``missing_routing``: completion rows and no decode routing; ``shape``: the two routings'
    layer or top-k axes differ), which the checks turn into the verdict.
    """
    if prefill.fault is not None:
        return _faulted(prefill, prefill.fault.kind, f"prefill: {prefill.fault.message}")
    if prefill.routing is None:
        return _faulted(prefill, "missing_routing", "prefill: the answer carried no routing")
    answer = prefill
    drows: np.ndarray | None = None
    if decode is not None:
        if decode.fault is not None and not (decode.fault.kind == "missing_routing"
                                             and decode.routing is None):
            return _faulted(decode, decode.fault.kind, f"decode: {decode.fault.message}")
        problem = _pair_problem(prefill, decode)
        if problem is not None:
            return _faulted(decode, "malformed", problem)
        answer, drows = decode, decode.routing
    for name, half in (("prefill", prefill), ("decode", decode)):
        if half is not None and half.native is not None and half.routing is not None and (
                half.native.shape != half.routing.shape[:1]):
            return _faulted(answer, "malformed", f"{name}'s native mask has shape "
                            f"{half.native.shape}, its routing {half.routing.shape[0]} rows")
    start, plen, n = answer.routed_start, answer.prompt_len, answer.num_tokens
    prows = prefill.routing
    if prows.ndim < 1 or prows.shape[0] != plen - start:
        got = prows.shape[0] if prows.ndim else 0
        return _faulted(answer, "row_count", f"prefill returned {got} routing rows, expected "
                        f"prompt_len {plen} - routed_start {start} = {plen - start} (its "
                        "prompt positions)")
    wanted = max(n - 1 - plen, 0)  # completion rows: positions prompt_len .. n - 2
    if drows is None:
        if wanted:
            return _faulted(answer, "missing_routing", f"decode returned no routing for the "
                            f"{wanted} completion rows (positions {plen}..{n - 2})")
        return _merged(answer, prows, prefill.native, None)
    full = n - 1 - start
    if drows.ndim < 1 or drows.shape[0] not in (full, wanted):
        got = drows.shape[0] if drows.ndim else 0
        return _faulted(answer, "row_count", f"decode returned {got} routing rows, expected "
                        f"{full} (tokens {n} - 1 - routed_start {start}) or {wanted} (its "
                        f"completion positions {plen}..{n - 2})")
    if drows.shape[1:] != prows.shape[1:]:
        return _faulted(answer, "shape", f"prefill's routing rows are {prows.shape[1:]}, "
                        f"decode's {drows.shape[1:]} (layers x top_k)")
    skip = drows.shape[0] - wanted
    dnative = None if decode is None or decode.native is None else decode.native[skip:]
    return _merged(answer, np.concatenate([prows, drows[skip:]]), prefill.native, dnative,
                   rows=(prows.shape[0], wanted))


def _pair_problem(prefill: WireSample, decode: WireSample) -> str | None:
    """What makes two answers not halves of one request, or ``None``."""
    for name in ("sample_id", "prompt_len", "routed_start"):
        a, b = getattr(prefill, name), getattr(decode, name)
        if a != b:
            return f"prefill's {name} is {a!r}, decode's {b!r}"
    p, d = prefill.tokens, decode.tokens
    m = min(p.shape[0], d.shape[0])
    diff = np.flatnonzero(p[:m] != d[:m])
    if diff.size:
        i = int(diff[0])
        return f"prefill's token at position {i} is {p[i]}, decode's {d[i]}"
    if p.shape[0] > d.shape[0]:
        return f"prefill holds {p.shape[0]} tokens, more than decode's {d.shape[0]}"
    return None


def _faulted(sample: WireSample, kind: str, message: str) -> WireSample:
    return _copy(sample, routing=None, native=None, fault=DecodeFault(kind, message))


def _merged(answer: WireSample, routing: np.ndarray, pnative: np.ndarray | None,
            dnative: np.ndarray | None, rows: tuple[int, int] | None = None) -> WireSample:
    native = None
    if pnative is not None or dnative is not None:
        p, d = rows if rows is not None else (routing.shape[0], 0)
        native = np.concatenate([
            pnative[:p] if pnative is not None else np.zeros(p, bool),
            dnative if dnative is not None else np.zeros(d, bool)])
        native = native if native.any() else None
    return _copy(answer, routing=routing, native=native, fault=None)


def _copy(s: WireSample, **changes: Any) -> WireSample:
    return dataclasses.replace(s, extra=dict(s.extra), **changes)


# --------------------------------------------------------------------------------------------
# internals


def _array(value: Any) -> np.ndarray:
    """A NumPy array from an array-like or a torch tensor (on any device)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _is_integer(a: np.ndarray) -> bool:
    return a.dtype.kind in "iu"


def _require_integer(a: np.ndarray, what: str) -> None:
    if not _is_integer(a):
        raise ValueError(f"{what} has dtype {a.dtype}, expected an integer dtype")


def _layer_axis(layers: int, k: int, geometry: RoutingGeometry, what: str) -> bool:
    """Whether ``layers`` is the MoE layers only (else every hidden layer); ``ValueError``
    when it is neither, or ``k`` is not the geometry's top-k."""
    if k != geometry.top_k:
        raise ValueError(f"{what} holds {k} ids per layer, expected top_k {geometry.top_k}")
    if layers == geometry.num_layers:
        return False
    if layers == geometry.num_moe_layers:
        return True
    raise ValueError(f"{what} has {layers} layers; expected {geometry.num_layers} (every "
                     f"hidden layer) or {geometry.num_moe_layers} (MoE layers only) for "
                     f"{geometry.describe()}")


def _mark(mark: Any, geometry: RoutingGeometry, dtype: np.dtype | None, what: str
          ) -> int | None:
    """The mark as an ``int`` (``None``: rows are not marked); ``ValueError`` for a mark that
    is an expert id or that ``dtype`` cannot hold."""
    if mark is None:
        return None
    if isinstance(mark, (bool, np.bool_)) or not isinstance(mark, (int, np.integer)):
        raise ValueError(f"mark must be an integer, got {mark!r:.40}")
    mark = int(mark)
    if 0 <= mark < geometry.num_experts:
        raise ValueError(f"mark {mark} is an expert id (ids are 0..{geometry.num_experts - 1}); "
                         "a mark must be an id no expert has, such as -1")
    if dtype is not None and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= mark <= info.max:
            raise ValueError(f"{what} is {np.dtype(dtype).name}, which cannot hold mark {mark}"
                             " (keep marked routing in a signed dtype)")
    return mark


def _native_rows(rows: np.ndarray, moe_only: bool, geometry: RoutingGeometry,
                 mark: int | None) -> np.ndarray | None:
    """``bool [rows]``: the rows whose every MoE-layer id is ``mark``."""
    if mark is None:
        return None
    hit = rows == mark
    if not moe_only:
        hit = hit[:, geometry.moe_index()]
    return hit.reshape(hit.shape[0], -1).all(axis=1)


def _to_wire(moe: np.ndarray, geometry: RoutingGeometry) -> np.ndarray:
    """MoE-layer rows ``[rows, num_moe_layers, k]`` on the wire's layer axis, dense layers
    zero (never looked at)."""
    out = np.zeros((moe.shape[0], geometry.num_layers, moe.shape[2]), dtype=moe.dtype)
    out[:, geometry.moe_index()] = moe
    return out


def _mask(mask: np.ndarray) -> np.ndarray:
    """The attention mask as ``bool``; ``ValueError`` for a value other than 0 and 1."""
    if mask.dtype == np.bool_:
        return mask
    valid = mask == 1
    bad = ~valid & (mask != 0)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"attention_mask holds {mask[b, t]} at row {b} column {t}; "
                         "expected 0 or 1")
    return valid


def _runs(valid: np.ndarray, sids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The first valid column and the count of valid columns of each row; ``ValueError``
    naming the first row without any, or whose valid columns are not one run."""
    counts = valid.sum(axis=1)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        b = int(empty[0])
        raise ValueError(f"attention_mask row {b} (sample {sids[b]!r}) has no valid token")
    first = valid.argmax(axis=1)
    last = valid.shape[1] - 1 - valid[:, ::-1].argmax(axis=1)
    holes = np.flatnonzero(last - first + 1 != counts)
    if holes.size:
        b = int(holes[0])
        gap = int(first[b] + np.argmin(valid[b, first[b]: last[b] + 1]))
        raise ValueError(f"attention_mask row {b} (sample {sids[b]!r}) has a hole: its valid "
                         f"tokens span columns {first[b]}..{last[b]} but column {gap} is 0; "
                         "the valid tokens of a row must be contiguous")
    return first, counts


def _ints(value: Any, n: int, what: str) -> np.ndarray:
    """One integer per sample (a scalar is broadcast) as ``int64 [n]``."""
    a = _array(value)
    if a.ndim == 0:
        a = np.full(n, a)
    if a.shape != (n,) or (a.size and not _is_integer(a)):
        raise ValueError(f"{what} must be an integer or {n} integers (one per sample), got "
                         f"{a.dtype} of shape {a.shape}")
    return a.astype(np.int64)


def _require_lengths(prompt: np.ndarray, start: np.ndarray, counts: np.ndarray,
                     sids: list[str]) -> None:
    bad = np.flatnonzero((prompt < 1) | (prompt > counts))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"sample {sids[b]!r} (row {b}): prompt length {prompt[b]} outside "
                         f"[1, {counts[b]}] (its tokens)")
    bad = np.flatnonzero((start < 0) | (start > prompt))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"sample {sids[b]!r} (row {b}): routed_start {start[b]} outside "
                         f"[0, prompt length {prompt[b]}]")


def _token_problem(ids: np.ndarray) -> int | None:
    """The flat index of the first id outside ``[0, 2**31)``, or ``None``."""
    if ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) <= _TOKEN_MAX):
        return None
    return int(np.argmax((ids < 0) | (ids > _TOKEN_MAX)))


def _tokens_of(ids: np.ndarray, valid: np.ndarray, sids: list[str]) -> np.ndarray:
    """The valid tokens of every row, concatenated, as ``int32``."""
    _require_integer(ids, "input_ids")
    tokens = ids[valid]
    i = _token_problem(tokens)
    if i is not None:
        b, t = np.argwhere(valid)[i]
        raise ValueError(f"input_ids row {b} (sample {sids[b]!r}) column {t} holds "
                         f"{ids[b, t]}, outside [0, 2**31)")
    return tokens.astype(np.int32, copy=False)


def _sample_tokens(value: Any, sid: str) -> np.ndarray:
    t = _array(value)
    if t.ndim != 1 or not _is_integer(t):
        raise ValueError(f"sample {sid!r}: tokens must be 1-D integers, got {t.dtype} of shape "
                         f"{t.shape}")
    i = _token_problem(t)
    if i is not None:
        raise ValueError(f"sample {sid!r}: token {i} is {t[i]}, outside [0, 2**31)")
    return t.astype(np.int32)  # a copy: the sample owns its tokens


def _sample_ids(sample_ids: Sequence[str], n: int) -> list[str]:
    sids = list(sample_ids)
    if len(sids) != n:
        raise ValueError(f"{len(sids)} sample ids for {n} samples")
    for sid in sids:
        problem = field_problem("sample_id", sid)
        if problem is not None:
            raise ValueError(problem)
    if len(set(sids)) != n:
        seen: set[str] = set()
        for sid in sids:
            if sid in seen:
                raise ValueError(f"sample id {sid!r} appears twice in one batch")
            seen.add(sid)
    return sids


def _per_sample_fields(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    out = list(values)
    if len(out) != n:
        raise ValueError(f"{len(out)} {name}s for {n} samples")
    for v in out:
        problem = field_problem(name, v)
        if problem is not None:
            raise ValueError(problem)
    return out


def _versions(value: int | Sequence[int | None] | None, n: int) -> list[int | None]:
    if value is None or isinstance(value, (int, np.integer)):
        value = [value] * n
    out = [int(v) if isinstance(v, np.integer) else v for v in value]
    return _per_sample_fields(out, n, "policy_version")


def _padded_logprobs(logprobs: Any, batch: int, completion: np.ndarray
                     ) -> list[np.ndarray | None]:
    if logprobs is None:
        return [None] * batch
    lp = _array(logprobs)
    if lp.ndim != 2 or lp.shape[0] != batch or (batch and lp.shape[1] < completion.max()):
        raise ValueError(f"logprobs has shape {lp.shape}; expected [batch {batch}, width >= "
                         f"{int(completion.max()) if batch else 0}] (each row's completion "
                         "log-probs first)")
    lp = lp.astype(np.float32, copy=False)
    return [lp[b, :c].copy() if c else None for b, c in enumerate(completion.tolist())]
