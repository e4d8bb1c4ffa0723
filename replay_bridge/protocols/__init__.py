"""Engine protocols: how to ask an engine for routed experts, how to decode its answer into
:class:`~replay_bridge.sample.WireSample`, and how an engine encodes it.

One module per protocol (``_sglang_generate``, ``_sglang_openai``, ``_vllm``), each a
:class:`Protocol` subclass, registered once in :data:`PROTOCOLS`.

``decode_response`` reads a response body as bytes and base64-decodes each routing payload
straight from those bytes; the payload never becomes a Python ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..geometry import RoutingGeometry
from ..sample import WireSample
from ._assemble import undecodable
from ._base import Completion, EngineCall, Protocol, SamplingParams
from ._npy import parse_npy, to_npy
from ._payload import Payloads, loads
from ._payload import split as split_payloads
from ._sglang_generate import SGLangGenerate, splice_routing
from ._sglang_openai import SGLangOpenAI
from ._vllm import VLLM

__all__ = [
    "PROTOCOLS",
    "VLLM",
    "Completion",
    "EngineCall",
    "Payloads",
    "Protocol",
    "SGLangGenerate",
    "SGLangOpenAI",
    "SamplingParams",
    "decode_parsed",
    "decode_response",
    "get_protocol",
    "parse_npy",
    "splice_routing",
    "split_payloads",
    "to_npy",
    "undecodable",
]

PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({
    p.name: p for p in (SGLangGenerate(), SGLangOpenAI(), VLLM())
})
"""Every protocol by name; adding one is one module and one line here."""


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (``ValueError`` naming the known ones)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; one of {', '.join(PROTOCOLS)}") from None


def decode_parsed(
    engine: str, request: dict[str, Any], response: Any, payloads: Payloads,
    geometry: RoutingGeometry, sample_id: str, *, group_id: str | None = None,
    policy_version: int | None = None,
) -> list[WireSample]:
    """Decode an already-parsed response whose payloads were split out by
    :func:`split_payloads`."""
    protocol = get_protocol(engine)
    if not isinstance(request, dict):
        return [undecodable(sample_id, "malformed", "request is not a JSON object", engine,
                            group_id, policy_version)]
    return protocol.decode(request, response, payloads, geometry, sample_id, group_id,
                           policy_version)


def decode_response(
    engine: str, request: dict[str, Any], body: bytes | bytearray | memoryview | dict | list,
    geometry: RoutingGeometry, sample_id: str, *, group_id: str | None = None,
    policy_version: int | None = None,
) -> list[WireSample]:
    """Decode one engine response (raw body bytes, or already-parsed JSON) into wire samples.

    One sample per batched item / choice, each with its ``index``; with several, ids are
    ``f"{sample_id}/{i}"``. A body that is not JSON yields one ``malformed`` sample; this
    function does not raise on bad input.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            response, payloads = loads(body)
        except ValueError as e:
            return [undecodable(sample_id, "malformed", f"response is not JSON: {e}", engine,
                                group_id, policy_version)]
    else:
        response, payloads = body, Payloads()
    return decode_parsed(engine, request, response, payloads, geometry, sample_id,
                         group_id=group_id, policy_version=policy_version)
