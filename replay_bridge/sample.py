"""The two sample types: what an engine returned (:class:`WireSample`) and what is stored
and replayed (:class:`RoutedSample`).

A ``WireSample`` carries the routing exactly as decoded from the engine: every hidden layer,
in the wire's dtype, possibly faulty. Only :func:`replay_bridge.checks.check_sample` decides
whether it is good; only a good one becomes a ``RoutedSample`` (MoE layers only, in the
geometry's narrow id dtype, engine order of the k ids kept).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DecodeFault", "RoutedSample", "WireSample", "field_problem", "short_repr",
           "type_name", "with_routing"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def type_name(value: object) -> str:
    """``"an int"``, ``"a list"``: how a message names the type a value has."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


class _ShortRepr(reprlib.Repr):
    def repr_str(self, x: str, level: int) -> str:
        # A long string is never quoted: it may be a credential an engine echoed.
        return repr(x) if len(x) <= 12 else f"<str of {len(x)} chars>"


_SHORT = _ShortRepr()
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxdict = 2
_SHORT.maxlevel = 2
_SHORT.maxlong = 24


def short_repr(value: object) -> str:
    """``repr`` cut short, for messages about untrusted values: a few items of a container,
    strings of more than 12 characters by their length only."""
    return _SHORT.repr(value)


def field_problem(name: str, value: object) -> str | None:
    """The rule a sample's ``sample_id`` (a non-empty string), ``group_id`` (a string or
    ``None``) or ``policy_version`` (an int64, never a bool, or ``None``) breaks, or ``None``.

    Every door a sample enters by (ingest's line envelope, the protocols' decoders) asks this,
    so nothing wrongly typed reaches the shard writer.
    """
    if name == "sample_id":
        if value is None:
            return "sample_id is missing"
        if not isinstance(value, str):
            return (f"sample_id {short_repr(value)} is {type_name(value)}, expected a "
                    "non-empty string")
        return "sample_id is empty" if not value else None
    if value is None:
        return None
    if name == "group_id":
        return None if isinstance(value, str) else (
            f"group_id {short_repr(value)} is {type_name(value)}, expected a string")
    if name == "policy_version":
        if isinstance(value, bool) or not isinstance(value, int):
            return (f"policy_version {short_repr(value)} is {type_name(value)}, expected an "
                    "integer")
        if not INT64_MIN <= value <= INT64_MAX:
            return f"policy_version {short_repr(value)} is outside int64"
        return None
    raise ValueError(f"no rule for field {name!r}")


@dataclass(frozen=True, slots=True)
class DecodeFault:
    """Why a response's routing could not be decoded: kind ``malformed``, ``missing_routing``
    or ``shape``, and a message that names the rule broken."""

    kind: str
    message: str


@dataclass(slots=True)
class _SampleFields:
    sample_id: str
    tokens: np.ndarray
    """Prompt + completion token ids, ``int32``."""
    prompt_len: int
    routed_start: int = 0
    """First token position that has a routing row (the start offset the request asked for)."""
    group_id: str | None = None
    policy_version: int | None = None
    logprobs: np.ndarray | None = None
    """Rollout log-probs of the completion tokens, ``float32 [completion_len]``."""
    engine: str | None = None
    finish_reason: str | None = None
    weight_versions: list[dict[str, Any]] | None = None
    """Policy versions that produced the completion: ``[{"version", "start", "end"}, ...]``."""
    native: np.ndarray | None = None
    """``bool [rows]``: rows without rollout routing, which the trainer routes natively (the
    router's own top-k). ``None``: no such row. Only in-memory adapters that were told the
    framework marks rows set it; engine decoders never do."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def completion_len(self) -> int:
        return self.num_tokens - self.prompt_len

    @property
    def expected_rows(self) -> int:
        """Rows an engine returns: every position but the last, from ``routed_start`` on."""
        return max(self.num_tokens - 1 - self.routed_start, 0)

    @property
    def native_rows(self) -> int:
        """How many rows are marked :attr:`native`."""
        return 0 if self.native is None else int(np.count_nonzero(self.native))


@dataclass(slots=True)
class WireSample(_SampleFields):
    """One sample as an engine returned it; its routing is unchecked.

    ``routing`` is ``[rows, num_layers, top_k]`` over every hidden layer in the dtype the engine
    sent (a view of the decoded bytes where possible), or ``None`` when ``fault`` says why
    there is none.

    Its other fields are typed by the decoders, whatever the engine sent: ``group_id`` and
    ``policy_version`` as :func:`field_problem` says (ingest checks ``sample_id`` too),
    ``tokens`` ``int32`` in ``[0, 2**31)``, ``0 <= routed_start <= prompt_len``, ``logprobs``
    ``float32`` no longer than the completion, ``finish_reason`` a string, ``weight_versions``
    ``{"version", "start", "end"}`` spans within the completion. A value that breaks one of
    these is a ``malformed`` fault, never a field.
    """

    routing: np.ndarray | None = None
    fault: DecodeFault | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine fields kept for diagnostics (not stored)."""
    index: int = 0
    """Which of the request's samples this is: the OpenAI choice's ``index``, the item's
    position in a batched answer; ``-1`` when the answer gives no usable index."""


@dataclass(slots=True)
class RoutedSample(_SampleFields):
    """A checked sample: ``routed`` is ``[rows, num_moe_layers, top_k]`` in the geometry's id
    dtype, engine order of the k ids kept. Row ``r`` is the routing of token position
    ``routed_start + r``."""

    routed: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0), np.uint8))

    @property
    def rows(self) -> int:
        return int(self.routed.shape[0])

    def full_routing(self, pad: np.ndarray | None = None) -> np.ndarray:
        """Routing for every token position ``[num_tokens, moe_layers, top_k]``.

        Positions before ``routed_start``, :attr:`native` rows and the last position have no
        rollout routing; they take ``pad`` rows (``[moe_layers, top_k]``) when given, else
        ``-1`` in an ``int32`` array.
        """
        n, (_, m, k) = self.num_tokens, self.routed.shape
        if pad is None:
            out = np.full((n, m, k), -1, dtype=np.int32)
        else:
            out = np.empty((n, m, k), dtype=np.result_type(self.routed.dtype, pad.dtype))
            out[:] = pad
        out[self.routed_start : self.routed_start + self.rows] = self.routed
        if self.native is not None and self.native.any():
            marked = self.routed_start + np.flatnonzero(self.native)
            out[marked] = -1 if pad is None else pad
        return out


def with_routing(sample: WireSample | RoutedSample, routed: np.ndarray) -> RoutedSample:
    """A :class:`RoutedSample` with ``sample``'s fields and the given stored routing."""
    return RoutedSample(
        sample_id=sample.sample_id,
        tokens=sample.tokens,
        prompt_len=sample.prompt_len,
        routed_start=sample.routed_start,
        group_id=sample.group_id,
        policy_version=sample.policy_version,
        logprobs=sample.logprobs,
        engine=sample.engine,
        finish_reason=sample.finish_reason,
        weight_versions=sample.weight_versions,
        native=sample.native,
        routed=routed,
    )
