"""What every engine protocol provides: how to ask, how to decode, how to encode.

A protocol is one engine API that returns routed experts (SGLang ``/generate``, SGLang's
OpenAI endpoints, vLLM's). Each lives in its own module as a :class:`Protocol` subclass and is
registered once in :data:`replay_bridge.protocols.PROTOCOLS`; nothing outside that module
spells the protocol's field names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..geometry import RoutingGeometry
from ..sample import WireSample
from ._payload import Payloads

__all__ = ["Completion", "EngineCall", "Protocol", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options every engine understands; ``extra`` is merged into the sampling part
    of the request as is (``sampling_params`` for ``/generate``, top level for OpenAI)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """When set, sample ``i`` of a prompt is drawn with seed ``seed + i`` (SGLang
    ``sampling_seed``, OpenAI ``seed``; vLLM's one request per group gets ``seed``)."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineCall:
    """One HTTP request and the sample ids its answer holds, in answer order."""

    path: str
    payload: dict[str, Any]
    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    """One sample as an engine produces it (the encoding side).

    ``routing`` is ``[rows, num_layers, top_k]`` from the request's start offset on, or
    ``None`` for an answer without routing; ``logprobs`` are the completion tokens' (a
    shorter list covers the first tokens only); ``meta`` is merged into the sample's
    metadata object as is.
    """

    output_ids: Sequence[int]
    routing: np.ndarray | None = None
    logprobs: Sequence[float] | None = None
    finish_reason: str = "length"
    meta: dict[str, Any] = field(default_factory=dict)


class Protocol:
    """One engine API: subclasses set the class attributes and implement the four methods.

    ``path`` is the completion endpoint, ``chat_path`` the chat one (``None``: token ids
    only), ``start_field`` the request field naming the first position to return routing for.
    """

    name: ClassVar[str]
    path: ClassVar[str]
    chat_path: ClassVar[str | None] = None
    start_field: ClassVar[str]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.path}>"

    # ---- ask --------------------------------------------------------------------------

    def plan(
        self,
        input_ids: Sequence[int],
        sample_ids: Sequence[str],
        params: SamplingParams,
        *,
        model: str | None = None,
        routed_start: int = 0,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[EngineCall]:
        """The requests that return one routed sample per id in ``sample_ids``; with
        ``messages``, chat requests. ``ValueError`` for a prompt this API cannot ask for."""
        raise NotImplementedError

    def calls_per_prompt(self, samples: int) -> int:
        """HTTP requests :meth:`plan` makes for one prompt of ``samples`` samples."""
        return samples

    def samples_asked(self, request: dict[str, Any]) -> int:
        """How many samples an answer to ``request`` holds: indices ``0 .. n-1``, ids
        ``<sample_id>/<i>`` when more than one. ``1`` when the request says so wrongly
        (:meth:`decode` then answers with one ``malformed`` sample)."""
        return 1

    def requested_start(self, request: dict[str, Any]) -> Any:
        """The start offset a request asked for, as sent (``0`` when absent)."""
        return request.get(self.start_field, 0) or 0

    # ---- decode -----------------------------------------------------------------------

    def decode(
        self, request: dict[str, Any], response: Any, payloads: Payloads,
        geometry: RoutingGeometry, sample_id: str, group_id: str | None = None,
        policy_version: int | None = None,
    ) -> list[WireSample]:
        """One :class:`WireSample` per item / choice of a parsed answer, each with its
        ``index``. Never raises on bad input: a value of the wrong type, a non-integer, an
        unreadable payload is a ``malformed`` sample whose message names the field, the first
        bad position and the rule; nothing is coerced."""
        raise NotImplementedError

    # ---- encode (the engine side) -------------------------------------------------------

    def encode_routing(self, rows: np.ndarray, dtype: str | None = None) -> str:
        """The ``routed_experts`` value an engine sends for ``rows``."""
        raise NotImplementedError

    def decode_routing(self, value: Any, geometry: RoutingGeometry,
                       dtype: str | None = None) -> np.ndarray:
        """The ids in one ``routed_experts`` value (``ValueError`` when not readable); the
        inverse of :meth:`encode_routing`, for engine-side tools such as a PD router."""
        raise NotImplementedError

    def encode_response(
        self, request: dict[str, Any], completions: Sequence[Completion], *,
        dtype: str | None = None,
    ) -> Any:
        """The JSON answer an engine sends to ``request`` with ``completions`` (one per
        choice / batched item), routing encoded with :meth:`encode_routing`."""
        raise NotImplementedError


def token_list(input_ids: Sequence[int]) -> list[int]:
    """Plain ints for JSON, from a list, a NumPy array or a CPU tensor alike."""
    if isinstance(input_ids, (list, tuple)):
        return list(input_ids)
    return np.asarray(input_ids).tolist()
