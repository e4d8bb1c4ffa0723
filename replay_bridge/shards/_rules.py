"""The storage rules of one shard row, in one place.

A stored sample keeps these rules; :class:`~replay_bridge.shards.ShardWriter` refuses a sample
that breaks one (:func:`conform`: :class:`UnstorableSample`), the reader refuses a row that
breaks one when its record batch is read, and ``validate`` reports every such row
(:func:`batch_breaks`, the same rules over a whole record batch in NumPy). The rules, in the
order they are checked (a sample is reported under the first it breaks):

=============== =================================================================================
``sample_id``   a non-empty string
``fields``      ``group_id``, ``engine``, ``finish_reason``: a string or null; ``policy_version``:
                an int64 or null; ``weight_versions``: a JSON list or null
``tokens``      a 1-D integer array of ids in ``[0, 2**31)``
``positions``   ``0 <= routed_start <= prompt_len <= len(tokens)``
``routing``     ``[rows, num_moe_layers, top_k]`` integer ids (a whole number of rows); ``native``
                null or one bool per routing row (no null values)
``expert_ids``  every id in ``[0, num_experts)``
``logprobs``    null, or a 1-D array of real numbers, at most one per completion token
=============== =================================================================================

Whether the routing itself is sound (row count, all-zero and repeated blocks) is a check of
:mod:`replay_bridge.checks`, not a storage rule: ``validate`` re-runs those separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa

from ..geometry import RoutingGeometry
from ..sample import INT64_MAX, INT64_MIN, RoutedSample
from ._errors import UnstorableSample

__all__ = ["RULES", "RuleBreak", "batch_breaks", "conform", "sample_break"]

RULES = ("sample_id", "fields", "tokens", "positions", "routing", "expert_ids", "logprobs")
TOKEN_LIMIT = 2**31


class RuleBreak(NamedTuple):
    """The first storage rule a sample (or a record batch row) breaks."""

    rule: str
    """One of :data:`RULES`."""
    message: str
    """``sample 'ID': what is wrong`` (the rule, the value, and where)."""
    sample_id: Any = None
    row: int = -1
    """The row in its record batch (:func:`batch_breaks` only)."""
    unreadable: bool = False
    """The row cannot be read back as a sample at all (a null in a required column, JSON
    that does not parse)."""


def _message(sample_id: object, text: str) -> str:
    return f"sample {sample_id!r:.80}{' ' if text.startswith('has ') else ': '}{text}"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ---- one sample -----------------------------------------------------------------------------


def conform(sample: RoutedSample, geometry: RoutingGeometry) -> np.ndarray:
    """``sample``'s routing in the geometry's id dtype, ready to store; raises
    :class:`UnstorableSample` naming the first rule it breaks."""
    routed, broken = _check(sample, geometry)
    if broken is not None:
        raise UnstorableSample(broken.message, sample_id=broken.sample_id)
    assert routed is not None
    return routed


def sample_break(sample: RoutedSample, geometry: RoutingGeometry) -> RuleBreak | None:
    """The first storage rule ``sample`` breaks, or ``None``."""
    return _check(sample, geometry)[1]


def _check(s: RoutedSample, g: RoutingGeometry) -> tuple[np.ndarray | None, RuleBreak | None]:
    sid = s.sample_id

    def broken(rule: str, what: str) -> tuple[None, RuleBreak]:
        return None, RuleBreak(rule, _message(sid, what), sid)

    if not isinstance(sid, str) or not sid:
        return broken("sample_id", f"sample id must be a non-empty string, got {sid!r:.80}")
    for name in ("group_id", "engine", "finish_reason"):
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            return broken("fields", f"{name} must be a string or null, got "
                                    f"{type(value).__name__}")
    v = s.policy_version
    if v is not None and not (_is_int(v) and INT64_MIN <= v <= INT64_MAX):
        return broken("fields", f"policy_version must be a 64-bit integer or null, got "
                                f"{v!r:.40}")
    wv = s.weight_versions
    if wv is not None:
        if not isinstance(wv, list):
            return broken("fields", f"weight_versions must be a list or null, got "
                                    f"{type(wv).__name__}")
        try:
            orjson.dumps(wv, option=orjson.OPT_SERIALIZE_NUMPY)
        except (orjson.JSONEncodeError, TypeError) as e:
            return broken("fields", f"weight_versions is not JSON: {e}")

    t = s.tokens
    if not isinstance(t, np.ndarray) or t.ndim != 1 or (t.size and t.dtype.kind not in "iu"):
        return broken("tokens", "tokens must be a 1-D integer array")
    if t.size:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= TOKEN_LIMIT:
            pos = int(np.argmax((t < 0) | (t >= TOKEN_LIMIT)))
            return broken("tokens", f"token id {int(t[pos])} at position {pos} is outside "
                                    f"[0, {TOKEN_LIMIT})")
    pl, rs = s.prompt_len, s.routed_start
    if not (_is_int(pl) and _is_int(rs) and 0 <= rs <= pl <= t.size):
        return broken("positions", f"need 0 <= routed_start ({rs!r:.20}) <= prompt_len "
                                   f"({pl!r:.20}) <= tokens ({t.size})")

    r = s.routed
    m, k, e = g.num_moe_layers, g.top_k, g.num_experts
    if not isinstance(r, np.ndarray) or r.ndim != 3 or tuple(r.shape[1:]) != (m, k):
        shape = tuple(r.shape) if isinstance(r, np.ndarray) else type(r).__name__
        return broken("routing", f"routing shape {shape} does not fit the shard geometry "
                                 f"[rows, {m}, {k}] (MoE layers x top_k)")
    if r.dtype.kind not in "iu":
        return broken("routing", f"routing dtype {r.dtype} is not integer")
    nat = s.native
    if nat is not None:
        if not (isinstance(nat, np.ndarray) and nat.dtype == np.bool_ and nat.ndim == 1):
            what = (f"{nat.dtype} of shape {tuple(nat.shape)}" if isinstance(nat, np.ndarray)
                    else type(nat).__name__)
            return broken("routing", f"native must be null or a 1-D bool array (one value "
                                     f"per routing row), got {what}")
        if nat.shape[0] != r.shape[0]:
            return broken("routing", f"native has {nat.shape[0]} values for {r.shape[0]} "
                                     "routing rows")
    if r.size and not (r.dtype == g.id_dtype and e == 1 << (8 * r.dtype.itemsize)):
        # Signed ids viewed as unsigned of the same width: a negative id is above any count.
        u = r.view(r.dtype.str.replace("i", "u")) if r.dtype.kind == "i" else r
        if int(u.max()) >= e:
            flat = int(np.argmax(u.reshape(-1) >= e))
            row, rest = divmod(flat, m * k)
            return broken("expert_ids", f"expert ids outside [0, {e}): "
                                        f"{int(r.reshape(-1)[flat])} at position {rs + row}, "
                                        f"layer {g.moe_layers[rest // k]}")
    if r.dtype != g.id_dtype:
        r = r.astype(g.id_dtype)

    lp = s.logprobs
    if lp is not None:
        a = np.asarray(lp)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "fiu"):
            return broken("logprobs", "logprobs must be a 1-D array of real numbers or null")
        if a.size > t.size - pl:
            return broken("logprobs", f"{a.size} log-probs for {t.size - pl} completion "
                                      "tokens (at most one per completion token)")
    return r, None


# ---- a record batch -------------------------------------------------------------------------


def batch_breaks(batch: pa.RecordBatch, geometry: RoutingGeometry) -> list[RuleBreak]:
    """The first storage rule each row of a shard record batch breaks (rows that keep every
    rule are left out), in row order.

    Vectorised and cheap enough for every batch the reader hands out: the buffers are read
    in place, one min over the token ids, one max over the routing ids (skipped when the id
    dtype holds nothing but expert ids), arithmetic on the offsets; Python runs only for rows
    that break a rule and to parse ``weight_versions`` (small JSON strings, when present). The
    batch must have the shard schema (the reader checks it when a shard is opened) and be
    Arrow-valid (``validate(full=True)``).
    """
    n = batch.num_rows
    if n == 0:
        return []
    cols = _Columns(batch)
    ids_col = cols["sample_id"]
    found: dict[int, RuleBreak] = {}

    def flag(mask: np.ndarray, rule: str, what: Callable[[int], str],
             unreadable: bool = False) -> None:
        if not mask.any():
            return
        for row in np.flatnonzero(mask).tolist():
            if row not in found:
                sid = ids_col[row].as_py()
                found[row] = RuleBreak(rule, _message(sid, what(row)), sid, row, unreadable)

    def null_rule(name: str, rule: str) -> None:
        col = cols[name]
        if col.null_count:
            flag(col.is_null().to_numpy(zero_copy_only=False), rule,
                 lambda _: f"{name} is null", unreadable=True)

    def ints(name: str) -> np.ndarray:
        col = cols[name]
        return (col.fill_null(0) if col.null_count else col).to_numpy()

    # sample_id
    null_rule("sample_id", "sample_id")
    flag(_lengths(_offsets(ids_col)) == 0, "sample_id",
         lambda _: "sample id must be a non-empty string, got ''")

    # fields (the schema fixes the other columns' types; weight_versions is JSON text)
    wv = cols["weight_versions"]
    if wv.null_count < n:
        for row, text in enumerate(wv.to_pylist()):
            if text is None:
                continue
            try:
                ok = isinstance(orjson.loads(text), list)
            except orjson.JSONDecodeError:
                flag(_row_mask(n, row), "fields", lambda _: "weight_versions is not JSON",
                     unreadable=True)
                continue
            if not ok:
                flag(_row_mask(n, row), "fields", lambda _: "weight_versions is not a list")

    # tokens: int32 values, so < 2**31 by type; only negatives are out
    null_rule("tokens", "tokens")
    t_col = cols["tokens"]
    t_off = _offsets(t_col)
    t_val = t_col.values.to_numpy(zero_copy_only=False)[t_off[0]:t_off[-1]]
    if t_val.size and int(t_val.min()) < 0:
        first_t = _first_per_row(t_val < 0, t_off)
        flag(first_t >= 0, "tokens",
             lambda row: f"token id {int(t_val[first_t[row]])} at position "
                         f"{first_t[row] + t_off[0] - t_off[row]} is outside [0, {TOKEN_LIMIT})")
    n_tok = _lengths(t_off)

    # positions
    null_rule("prompt_len", "positions")
    null_rule("routed_start", "positions")
    pl, rs = ints("prompt_len"), ints("routed_start")
    flag(~((rs >= 0) & (rs <= pl) & (pl <= n_tok)), "positions",
         lambda row: f"need 0 <= routed_start ({rs[row]}) <= prompt_len ({pl[row]}) <= "
                     f"tokens ({n_tok[row]})")

    # routing: a whole number of [num_moe_layers, top_k] rows per sample
    m, k, e = geometry.num_moe_layers, geometry.top_k, geometry.num_experts
    per_row = m * k
    null_rule("routed", "routing")
    r_col = cols["routed"]
    r_off = _offsets(r_col)
    n_ids = _lengths(r_off)
    flag(n_ids % per_row != 0, "routing",
         lambda row: f"has {n_ids[row]} routing ids, not a whole number of [{m}, {k}] rows")
    if batch.schema.get_field_index("native") >= 0:  # formats 3 and 4
        _native_breaks(cols["native"], n_ids // per_row, flag)

    # expert_ids: one max over the batch's ids unless the id dtype holds no other values
    r_val = r_col.values.to_numpy(zero_copy_only=False)[r_off[0]:r_off[-1]]
    if r_val.size and e < 1 << (8 * r_val.dtype.itemsize) and int(r_val.max()) >= e:
        first_r = _first_per_row(r_val >= e, r_off)

        def id_msg(row: int) -> str:
            j = first_r[row] + r_off[0] - r_off[row]
            return (f"expert ids outside [0, {e}): {int(r_val[first_r[row]])} at position "
                    f"{rs[row] + j // per_row}, layer {geometry.moe_layers[(j % per_row) // k]}")
        flag(first_r >= 0, "expert_ids", id_msg)

    # logprobs
    lp = cols["logprobs"]
    if lp.null_count < n:
        n_lp = _lengths(_offsets(lp))
        valid = lp.is_valid().to_numpy(zero_copy_only=False) if lp.null_count else True
        flag(valid & (n_lp > n_tok - pl), "logprobs",
             lambda row: f"{n_lp[row]} log-probs for {n_tok[row] - pl[row]} completion tokens "
                         "(at most one per completion token)")
    return [found[row] for row in sorted(found)]


def _native_breaks(col: pa.Array, rows: np.ndarray,
                   flag: Callable[[np.ndarray, str, Callable[[int], str]], None]) -> None:
    """The ``routing`` rule's part on the ``native`` column: a list of one bool per routing
    row (``rows``), no null values, where not null."""
    if col.null_count == len(col):
        return
    off = _offsets(col)
    n_nat = _lengths(off)
    valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else True
    flag(valid & (n_nat != rows), "routing",
         lambda row: f"native has {n_nat[row]} values for {rows[row]} routing rows")
    values = col.values
    if values.null_count:
        nulls = values.is_null().to_numpy(zero_copy_only=False)[off[0]:off[-1]]
        if nulls.any():
            first = _first_per_row(nulls, off)
            flag((first >= 0) & valid, "routing",
                 lambda row: f"native holds a null at row {first[row] + off[0] - off[row]}")


class _Columns:
    """A record batch's columns by name, each looked up once."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self._batch = batch
        self._cols: dict[str, pa.Array] = {}

    def __getitem__(self, name: str) -> pa.Array:
        col = self._cols.get(name)
        if col is None:
            col = self._cols[name] = self._batch.column(name)
        return col


def _lengths(offsets: np.ndarray) -> np.ndarray:
    return offsets[1:] - offsets[:-1]


def _offsets(col: pa.Array) -> np.ndarray:
    """The ``len + 1`` offsets of a list or string array, read in place (absolute positions
    into its values)."""
    return np.frombuffer(col.buffers()[1], dtype=np.int32, count=len(col) + 1,
                         offset=4 * col.offset)


def _row_mask(n: int, row: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[row] = True
    return mask


def _first_per_row(bad: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each row, the index into ``bad`` (values from ``offsets[0]`` on) of its first
    ``True``, or ``-1``. Only run when some value is bad."""
    idx = np.flatnonzero(bad)
    rows = np.searchsorted(offsets, idx + offsets[0], side="right") - 1
    first = np.full(len(offsets) - 1, -1, dtype=np.int64)
    first[rows[::-1]] = idx[::-1]  # the last assignment per row wins: its first bad value
    return first
