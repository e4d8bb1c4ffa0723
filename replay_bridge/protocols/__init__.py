"""Engine protocols: how to ask an engine for routed experts, how to decode its answer into
:class:`~replay_bridge.sample.WireSample`, and how an engine encodes it.

One module per protocol (``_sglang_generate``, ``_sglang_openai``, ``_vllm``), each a
:class:`Protocol` subclass, registered once in :data:`PROTOCOLS`.

``decode_response`` reads a response body as bytes and base64-decodes each routing payload
straight from those bytes; the payload never becomes a Python ``str``. Decoding never raises on
what an engine sends: every wrongly typed, non-integer or unreadable value is a ``malformed``
sample naming the field and position; ``unanswered`` names the asked-for samples an answer holds
none for.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..geometry import RoutingGeometry
from ..sample import WireSample, field_problem, type_name
from ._assemble import Context, answer_id, undecodable
from ._base import Completion, EngineCall, Protocol, SamplingParams
from ._npy import parse_npy, to_npy
from ._payload import Payloads
from ._payload import loads as load_payloads
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
    "load_payloads",
    "parse_npy",
    "splice_routing",
    "split_payloads",
    "to_npy",
    "unanswered",
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
    :func:`split_payloads`.

    ``group_id`` (a string) and ``policy_version`` (an int64) are checked here, at the door:
    a wrong type is ``malformed`` for every asked-for sample and goes no further. This
    function does not raise on bad input: should a decoder itself fail, that too is a
    ``malformed`` sample (``decoder error``) for every asked-for sample.
    """
    protocol = get_protocol(engine)
    if not isinstance(request, dict):
        return [undecodable(sample_id, "malformed", f"the request is {type_name(request)}, "
                            "expected a JSON object", engine)]
    problem = field_problem("group_id", group_id) or field_problem("policy_version",
                                                                   policy_version)
    if problem is not None:
        return _refused(engine, request, sample_id, problem)
    try:
        return protocol.decode(request, response, payloads, geometry, sample_id, group_id,
                               policy_version)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one answer, one verdict
        return _refused(engine, request, sample_id, f"decoder error {type(e).__name__}: {e}",
                        group_id, policy_version)


def _refused(engine: str, request: Any, sample_id: str, message: str,
             group_id: Any = None, policy_version: Any = None) -> list[WireSample]:
    """One ``malformed`` sample per asked-for sample; group and version kept only when they
    keep their rules."""
    if field_problem("group_id", group_id) or field_problem("policy_version", policy_version):
        group_id = policy_version = None
    asked = get_protocol(engine).samples_asked(request) if isinstance(request, dict) else 1
    return Context(engine, group_id, policy_version).all_failed(sample_id, asked, message)


def unanswered(engine: str, request: Any, samples: list[WireSample], sample_id: str
               ) -> list[str]:
    """The ids of the samples ``request`` asks for that the decoded ``samples`` hold none
    for (by ``index``): e.g. fewer vLLM choices than the request's ``n``."""
    if not isinstance(request, dict):
        return []
    asked = get_protocol(engine).samples_asked(request)
    seen = {s.index for s in samples}
    return [answer_id(sample_id, i, asked) for i in range(asked) if i not in seen]


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
            response, payloads = load_payloads(body)
        except ValueError as e:
            return _refused(engine, request, sample_id, f"response is not JSON: {e}", group_id,
                            policy_version)
    else:
        response, payloads = body, Payloads()
    return decode_parsed(engine, request, response, payloads, geometry, sample_id,
                         group_id=group_id, policy_version=policy_version)
