"""Decoding helpers every protocol shares: turn the parts of one response item into a
:class:`WireSample`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import DecodeFault, WireSample

def token_array(ids: Any, what: str) -> np.ndarray:
    """Token ids (a JSON list) as ``int32``; ``ValueError`` when not a flat list of ints."""
    if ids is None:
        return np.empty(0, np.int32)
    if not isinstance(ids, list):
        raise ValueError(f"{what} is {type(ids).__name__}, expected a list of token ids")
    try:
        arr = np.array(ids, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} is not a flat list of integer token ids") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} is not a flat list of token ids")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} holds token ids outside int32")
    return arr.astype(np.int32)


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


def logprob_array(values: Sequence[Any] | None) -> np.ndarray | None:
    """Completion log-probs as ``float32`` from SGLang triples ``[lp, id, text]``, OpenAI dicts
    ``{"logprob": ...}``, or plain floats; ``None`` when absent or unreadable."""
    if not values:
        return None
    first = values[0]
    try:
        if isinstance(first, (list, tuple)):
            col = np.array(values, dtype=object)[:, 0]
        elif isinstance(first, dict):
            col = np.fromiter((v.get("logprob") for v in values), dtype=object, count=len(values))
        else:
            col = np.asarray(values, dtype=object)
        col = np.where(col == None, np.nan, col)  # noqa: E711 - elementwise on an object array
        return col.astype(np.float32)
    except (TypeError, ValueError, IndexError):
        return None


def finish_reason(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("type")
    return None if value is None else str(value)


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



def start_offset(request: dict[str, Any], key: str, prompt_len: int) -> int | str:
    """The request's row offset, or an error message."""
    value = request.get(key, 0) or 0
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{key}={value!r} is not an integer"
    if not 0 <= value <= prompt_len:
        return f"{key}={value} is outside [0, prompt_len={prompt_len}]"
    return value


def weight_versions(meta: dict[str, Any], completion_len: int) -> list[dict[str, Any]] | None:
    spans = meta.get("weight_versions")
    if isinstance(spans, list) and spans:
        return [dict(s) if isinstance(s, dict) else {"version": s} for s in spans]
    version = meta.get("weight_version")
    if version is None:
        return None
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


def request_prompt(request: dict[str, Any], key: str = "prompt") -> list[int] | None:
    """The request's prompt when it was sent as token ids (not text)."""
    ids = request.get(key)
    if isinstance(ids, list) and ids and isinstance(ids[0], int):
        return ids
    return None


def align(
    ctx: Context, sample_id: str, request: dict[str, Any], prompt_ids: Any, output_ids: Any,
    start_key: str, index: int = 0,
) -> tuple[np.ndarray, np.ndarray, int] | WireSample:
    """Prompt and completion token arrays and the row offset, or the ``malformed`` sample."""
    try:
        prompt = token_array(prompt_ids, "prompt token ids")
        output = token_array(output_ids, "completion token ids")
    except ValueError as e:
        return ctx.failed(sample_id, "malformed", str(e), index=index)
    if prompt.size == 0:
        return ctx.failed(sample_id, "malformed", "no prompt token ids: send the prompt as token "
                          "ids, or ask the engine to return them", index=index)
    start = start_offset(request, start_key, int(prompt.size))
    if isinstance(start, str):
        return ctx.failed(sample_id, "malformed", start, prompt, index=index)
    return prompt, output, start
