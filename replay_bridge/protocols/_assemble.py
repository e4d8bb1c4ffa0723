"""Decoding helpers every protocol shares: turn the parts of one response item into a
:class:`WireSample`."""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import INT64_MAX, INT64_MIN, DecodeFault, WireSample, short_repr, type_name

MAX_SAMPLES = 4096
"""The most samples one request may ask for (OpenAI ``n``, SGLang prompts x ``n``): a larger
ask is ``malformed``, so that one answer cannot flood the verdicts with unanswered samples."""

INT32_MAX = int(np.iinfo(np.int32).max)


class BadField(ValueError):
    """A request or answer field that breaks its rule; the message names the field, the first
    bad position and the rule. Decoders turn it into a ``malformed`` sample."""


def as_object(value: Any, what: str) -> dict[str, Any]:
    """A JSON object field: ``{}`` when absent (``None``), :class:`BadField` when not an
    object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadField(f"{what} is {type_name(value)}, expected an object")
    return value


def _where(i: int, shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return f"position {i}"
    return f"element [{', '.join(str(int(j)) for j in np.unravel_index(i, shape))}]"


def int_array(value: Any, what: str, *, flat: bool = False, lo: int = INT64_MIN,
              hi: int = INT64_MAX) -> np.ndarray:
    """A JSON array of integers (``flat``: a list of them; else nested to any regular shape)
    as ``int64`` of that shape. :class:`BadField` naming the first element that is not an
    integer (a float, even ``3.0``, a numeric string, a bool, ``null``) or lies outside
    ``[lo, hi]``; nothing is ever coerced.

    Vectorised: NumPy builds the array, and the element types are collected by ``map`` in C.
    """
    if not isinstance(value, list):
        raise BadField(f"{what} is {type_name(value)}, expected a list of integers")
    items: Any
    shape: tuple[int, ...] | None
    if flat:
        items, shape = value, None
    else:
        try:
            nested = np.array(value, dtype=object)
        except (ValueError, TypeError, RecursionError):
            raise BadField(f"{what} is not a regular array of integers") from None
        items, shape = nested.reshape(-1), nested.shape
    if not set(map(type, items)) <= {int}:
        i = next(i for i, t in enumerate(map(type, items)) if t is not int)
        raise BadField(f"{what}: {_where(i, shape)} is {type_name(items[i])} "
                       f"({short_repr(items[i])}), not an integer")
    try:
        arr = np.array(items, dtype=np.int64)
    except OverflowError:
        arr = None
    if arr is None or (arr.size and (int(arr.min()) < lo or int(arr.max()) > hi)):
        i = next(i for i, v in enumerate(items) if not lo <= v <= hi)
        raise BadField(f"{what}: {_where(i, shape)} is {short_repr(items[i])}, outside "
                       f"[{lo}, {hi}]")
    return arr if shape is None else arr.reshape(shape)


def token_array(ids: Any, what: str) -> np.ndarray:
    """Token ids (a JSON list of integers in ``[0, 2**31)``) as ``int32``; ``None`` is no
    tokens. :class:`BadField` naming the first bad position otherwise."""
    if ids is None:
        return np.empty(0, np.int32)
    return int_array(ids, what, flat=True, lo=0, hi=INT32_MAX).astype(np.int32)


def flat_to_blocks(
    raw: bytes, dtype: str, geometry: RoutingGeometry, expected_rows: int
) -> np.ndarray | DecodeFault:
    """Raw id bytes -> ``[rows, num_layers, top_k]`` (a view), or the fault."""
    dt = np.dtype(dtype)
    if len(raw) % dt.itemsize:
        return DecodeFault(
            "malformed",
            f"routing holds {len(raw)} bytes, not a whole number of {dt.name} ids",
        )
    ids = np.frombuffer(raw, dtype=dt)
    block = geometry.wire_ids_per_token
    if ids.size % block:
        moe_block = geometry.ids_per_token
        if moe_block != block and ids.size == expected_rows * moe_block:
            return DecodeFault(
                "shape",
                f"routing holds {ids.size} ids = {expected_rows} rows x {geometry.num_moe_layers} "
                f"MoE layers x top_k {geometry.top_k}; expected every one of the "
                f"{geometry.num_layers} hidden layers per row",
            )
        return DecodeFault(
            "malformed",
            f"routing holds {ids.size} ids, not a whole number of rows of "
            f"{geometry.num_layers} layers x top_k {geometry.top_k} = {block} ids",
        )
    return ids.reshape(-1, geometry.num_layers, geometry.top_k)


_NUMBERS = {float, int, type(None)}
_MISSING = object()


_FORMS = {"triples": (list, "a [logprob, token id, text] list"),
          "objects": (dict, "a {logprob, ...} object"), "numbers": (None, "a number")}


def logprob_array(values: Any, what: str, completion_len: int, form: str) -> np.ndarray | None:
    """Completion log-probs as ``float32`` (``null`` -> NaN) from a list in the field's
    ``form``: SGLang ``triples`` ``[logprob, token_id, text]``, OpenAI chat ``objects``
    ``{"logprob": ...}`` or plain ``numbers``; ``None`` when absent or empty.
    :class:`BadField` naming the first item that is not of the form (a numeric string, a bool,
    another form), and for more values than ``completion_len`` tokens: nothing is dropped or
    coerced silently."""
    if values is None:
        return None
    if not isinstance(values, list):
        raise BadField(f"{what} is {type_name(values)}, expected a list")
    if not values:
        return None
    if len(values) > completion_len:
        raise BadField(f"{what} holds {len(values)} log-probs for {completion_len} completion "
                       "tokens")
    kind, like = _FORMS[form]
    col: list[Any] = values
    if kind is not None:
        if set(map(type, values)) != {kind}:
            i = next(i for i, v in enumerate(values) if type(v) is not kind)
            raise BadField(f"{what}: item {i} is {type_name(values[i])}, expected {like}")
        if kind is list:
            try:
                col = list(map(itemgetter(0), values))
            except IndexError:
                i = next(i for i, v in enumerate(values) if not v)
                raise BadField(f"{what}: item {i} is an empty list") from None
        else:
            col = list(map(methodcaller("get", "logprob", _MISSING), values))
            if col.count(_MISSING):
                i = next(i for i, v in enumerate(col) if v is _MISSING)
                raise BadField(f"{what}: item {i} has no logprob")
    types = set(map(type, col))
    if not types <= _NUMBERS:
        i = next(i for i, v in enumerate(col) if type(v) not in _NUMBERS)
        verb = "is" if col is values else "holds"
        raise BadField(f"{what}: item {i} {verb} {type_name(col[i])} ({short_repr(col[i])}), "
                       "not a number")
    try:
        if type(None) in types:
            obj = np.array(col, dtype=object)
            obj[np.equal(obj, None)] = np.nan
            return obj.astype(np.float32)
        return np.array(col, dtype=np.float32)
    except (OverflowError, ValueError, TypeError) as e:
        raise BadField(f"{what}: not a list of numbers ({e})") from None


def finish_reason(value: Any) -> str | None:
    """SGLang's ``{"type": ...}`` object or OpenAI's string; :class:`BadField` otherwise."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is None or isinstance(kind, str):
            return kind
    raise BadField(f"finish_reason {short_repr(value)} is {type_name(value)}, expected a "
                   "string or an object whose type is a string")


def build(
    *,
    sample_id: str,
    index: int = 0,
    prompt: np.ndarray,
    output: np.ndarray,
    start: int,
    routing: np.ndarray | DecodeFault | None,
    engine: str,
    group_id: str | None,
    policy_version: int | None,
    logprobs: np.ndarray | None = None,
    finish: str | None = None,
    weight_versions: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> WireSample:
    tokens = np.concatenate([prompt, output]) if output.size else prompt
    fault = routing if isinstance(routing, DecodeFault) else None
    return WireSample(
        sample_id=sample_id,
        index=index,
        tokens=tokens,
        prompt_len=int(prompt.shape[0]),
        routed_start=start,
        group_id=group_id,
        policy_version=policy_version,
        logprobs=logprobs,
        engine=engine,
        finish_reason=finish,
        weight_versions=weight_versions,
        routing=None if fault is not None else routing,
        fault=fault,
        extra=extra or {},
    )


def undecodable(
    sample_id: str, kind: str, message: str, protocol: str, group_id: str | None = None,
    policy_version: int | None = None, prompt: np.ndarray | None = None, *, index: int = 0,
) -> WireSample:
    """A sample whose response could not be read at all: fault ``kind`` with ``message``."""
    p = prompt if prompt is not None else np.empty(0, np.int32)
    return WireSample(
        sample_id=sample_id, index=index, tokens=p, prompt_len=int(p.shape[0]), engine=protocol,
        group_id=group_id, policy_version=policy_version, fault=DecodeFault(kind, message),
    )


def start_offset(request: dict[str, Any], key: str, prompt_len: int) -> int:
    """The request's row offset (``0`` when absent); :class:`BadField` when it is not an
    integer in ``[0, prompt_len]``."""
    value = request.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadField(f"{key}={short_repr(value)} is {type_name(value)}, expected an integer")
    if not 0 <= value <= prompt_len:
        raise BadField(f"{key}={value} is outside [0, prompt_len={prompt_len}]")
    return value


def _version_problem(value: Any) -> str | None:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)
                                  and INT64_MIN <= value <= INT64_MAX):
        return None
    return f"{short_repr(value)} is {type_name(value)}, expected a string or an int64"


def weight_versions(meta: dict[str, Any], completion_len: int) -> list[dict[str, Any]] | None:
    """The policy versions that produced the completion: ``weight_versions`` spans
    ``{"version", "start", "end"}`` (``0 <= start <= end <= completion_len``), else one span
    of ``weight_version``; ``None`` when neither is sent. :class:`BadField` naming the first
    bad span or value."""
    spans = meta.get("weight_versions")
    if spans is not None and not isinstance(spans, list):
        raise BadField(f"weight_versions is {type_name(spans)}, expected a list of "
                       "{version, start, end} spans")
    if spans:
        if len(spans) > max(completion_len, 1):
            raise BadField(f"weight_versions holds {len(spans)} spans for {completion_len} "
                           "completion tokens")
        out = []
        for i, span in enumerate(spans):  # at most one per completion token
            if not isinstance(span, dict):
                raise BadField(f"weight_versions: span {i} is {type_name(span)}, expected a "
                               "{version, start, end} object")
            version, a, b = span.get("version"), span.get("start"), span.get("end")
            problem = _version_problem(version)
            if problem is not None:
                raise BadField(f"weight_versions: span {i}: version {problem}")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)) \
                    or not 0 <= a <= b <= completion_len:
                raise BadField(f"weight_versions: span {i} has start {short_repr(a)}, end "
                               f"{short_repr(b)}; expected integers with 0 <= start <= end <= "
                               f"{completion_len} (the completion's length)")
            out.append({"version": version, "start": a, "end": b})
        return out
    version = meta.get("weight_version")
    if version is None:
        return None
    problem = _version_problem(version)
    if problem is not None:
        raise BadField(f"weight_version {problem}")
    return [{"version": version, "start": 0, "end": completion_len}]


@dataclass(frozen=True)
class Context:
    """Per-response fields every sample of it shares."""

    engine: str
    group_id: str | None = None
    policy_version: int | None = None

    def failed(self, sample_id: str, kind: str, message: str,
               prompt: np.ndarray | None = None, *, index: int = 0) -> WireSample:
        return undecodable(sample_id, kind, message, self.engine, self.group_id,
                           self.policy_version, prompt, index=index)

    def all_failed(self, sample_id: str, asked: int, message: str) -> list[WireSample]:
        """One ``malformed`` sample per asked-for index (ids ``<id>/<i>`` when several)."""
        return [self.failed(answer_id(sample_id, i, asked), "malformed", message, index=i)
                for i in range(asked)]


def answer_id(sample_id: str, index: int, asked: int) -> str:
    """The id of sample ``index`` of an answer to a request for ``asked`` samples."""
    return f"{sample_id}/{index}" if asked > 1 else sample_id


def first_present(*values: Any) -> Any:
    """The first value that is not ``None`` (``None`` when all are)."""
    return next((v for v in values if v is not None), None)


def request_prompt(request: dict[str, Any], key: str = "prompt") -> Any:
    """The request's prompt when it was sent as token ids: a non-empty list that is not text
    (strings) or a batch (lists); its items are checked by :func:`token_array`."""
    ids = request.get(key)
    if not isinstance(ids, list) or not ids:
        return None
    types = set(map(type, ids))
    return None if types <= {str} or types <= {list} else ids


def align(request: dict[str, Any], prompt_ids: Any, output_ids: Any, start_key: str
          ) -> tuple[np.ndarray, np.ndarray, int]:
    """Prompt and completion token arrays and the row offset; :class:`BadField` naming the
    rule broken."""
    prompt = token_array(prompt_ids, "prompt token ids")
    output = token_array(output_ids, "completion token ids")
    if prompt.size == 0:
        raise BadField("no prompt token ids: send the prompt as token ids, or ask the engine "
                       "to return them")
    return prompt, output, start_offset(request, start_key, int(prompt.size))
