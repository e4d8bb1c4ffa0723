"""Engine wire formats -> :class:`~replay_bridge.sample.WireSample`.

``decode_response`` reads a response body as bytes and base64-decodes each routing payload
straight from those bytes; the payload never becomes a Python ``str``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..geometry import RoutingGeometry
from ..sample import WireSample
from . import _assemble
from ._npy import parse_npy, to_npy
from ._payload import Payloads, loads
from ._payload import split as split_payloads
from .sglang import decode_generate, decode_openai
from .vllm import decode_completions

__all__ = ["ENGINES", "Payloads", "decode_parsed", "decode_response", "parse_npy", "split_payloads",
           "to_npy", "undecodable"]

undecodable = _assemble.failed

Decoder = Callable[..., list[WireSample]]

ENGINES: dict[str, Decoder] = {
    "sglang": decode_generate,
    "sglang-openai": decode_openai,
    "vllm": decode_completions,
}


def decode_parsed(
    engine: str, request: dict[str, Any], response: Any, payloads: Payloads,
    geometry: RoutingGeometry, sample_id: str, *, group_id: str | None = None,
    policy_version: int | None = None,
) -> list[WireSample]:
    """Decode an already-parsed response whose payloads were split out by :func:`loads`."""
    try:
        decoder = ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}") from None
    if not isinstance(request, dict):
        return [_assemble.failed(sample_id, "malformed", "request is not a JSON object", engine,
                                 group_id, policy_version)]
    return decoder(request, response, payloads, geometry, sample_id, group_id, policy_version)


def decode_response(
    engine: str, request: dict[str, Any], body: bytes | bytearray | memoryview | dict | list,
    geometry: RoutingGeometry, sample_id: str, *, group_id: str | None = None,
    policy_version: int | None = None,
) -> list[WireSample]:
    """Decode one engine response (raw body bytes, or already-parsed JSON) into wire samples.

    One sample per batched item / choice; with several, ids are ``f"{sample_id}/{i}"``. A body
    that is not JSON yields one ``malformed`` sample; this function does not raise on bad input.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            response, payloads = loads(body)
        except ValueError as e:
            return [_assemble.failed(sample_id, "malformed", f"response is not JSON: {e}", engine,
                                     group_id, policy_version)]
    else:
        response, payloads = body, Payloads()
    return decode_parsed(engine, request, response, payloads, geometry, sample_id,
                         group_id=group_id, policy_version=policy_version)
