"""RolloutClient.finish over hostile answers: every asked-for sample gets an outcome, a bad
answer is a verdict for its own samples, and nothing raises."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

import replay_bridge.client._client as client_module
from replay_bridge.client import MockTransport, Prompt, RolloutClient, SamplingParams
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, get_protocol

SAMPLES = {"sglang": 1, "sglang-openai": 1, "vllm": 2}


def _rows(g: RoutingGeometry, n: int, shift: int = 0) -> np.ndarray:
    ids = (np.arange(n * g.num_layers * g.top_k).reshape(n, g.num_layers, g.top_k) + shift)
    return (ids % g.num_experts).astype(np.int32)


def _answer(engine: str, g: RoutingGeometry, payload: dict[str, Any]) -> Any:
    """A good answer to ``payload`` from the protocol's own encoder."""
    prompt = payload.get("input_ids", payload.get("prompt"))
    n = payload.get("n", 1)
    return get_protocol(engine).encode_response(payload, [
        Completion([7, 8], _rows(g, len(prompt) + 1, i), logprobs=[-0.5, -0.5])
        for i in range(n)])


def _generate(engine: str, g: RoutingGeometry, spoil: Callable[[Any], Any]) -> list[Any]:
    def handler(path: str, payload: dict[str, Any]) -> bytes:
        body = _answer(engine, g, payload)
        changed = spoil(body)
        return orjson.dumps(body if changed is None else changed)

    async def go() -> list[Any]:
        async with RolloutClient("mock://", engine, g, params=SamplingParams(2),
                                 transport=MockTransport(handler)) as client:
            return await client.generate(Prompt("p", [1, 2, 3]), samples=SAMPLES[engine])

    return asyncio.run(go())


def _each_choice(body: dict[str, Any], **fields: Any) -> None:
    for choice in body["choices"]:
        choice.update(fields)


SPOILS: list[tuple[str, str, Callable[[Any], Any]]] = [
    ("sglang", "meta_info a list", lambda b: b.update(meta_info=[1])),
    ("sglang", "logprobs an int", lambda b: b["meta_info"].update(output_token_logprobs=3)),
    ("sglang", "logprobs mixed", lambda b: b["meta_info"].update(
        output_token_logprobs=[{"logprob": -1.0}, 3])),
    ("sglang", "a list for one sample", lambda b: [b, b]),
    ("sglang", "token ids as floats", lambda b: b.update(output_ids=[7.0, 8.0])),
    ("sglang-openai", "sglext a list", lambda b: b.update(sglext=[1])),
    ("sglang-openai", "meta_info a list", lambda b: b["choices"][0].update(meta_info=[3])),
    ("vllm", "logprobs a number", lambda b: _each_choice(b, logprobs=5)),
    ("vllm", "choices not objects", lambda b: b.update(choices=[7, 8])),
    ("vllm", "routing as float lists", lambda b: _each_choice(
        b, routed_experts=(np.zeros((4, 4, 2)) + [0.5, 1.5]).tolist())),
]


@pytest.mark.parametrize("engine, case, spoil", SPOILS, ids=[f"{e}-{c}" for e, c, _ in SPOILS])
def test_every_asked_for_sample_gets_an_outcome(tiny, engine, case, spoil):
    results = _generate(engine, tiny, spoil)
    asked = ["p"] if SAMPLES[engine] == 1 else [f"p/{i}" for i in range(SAMPLES[engine])]
    assert [r.sample_id for r in results] == asked
    for r in results:
        assert r.outcome in ("rejected", "failed"), (case, r)
        text = r.report.message if r.report is not None else r.error
        assert repr(r.sample_id) in text, text
        if r.report is not None:
            assert r.report.kinds == ("malformed",), (case, r.report.message)


@pytest.mark.parametrize("engine", list(SAMPLES))
def test_the_good_answer_is_accepted(tiny, engine):
    """The base the spoiled answers come from is accepted as it is."""
    assert [r.outcome for r in _generate(engine, tiny, lambda b: None)] == \
        ["accepted"] * SAMPLES[engine]


def test_a_stray_choice_never_stands_for_the_asked_for_sample(tiny):
    """A one-sample answer whose first choice has an index outside the request's ``n``: the
    sample is the choice with index 0, not the first in the list."""
    def spoil(body: dict[str, Any]) -> None:
        stray = {**body["choices"][0], "index": 5, "token_ids": [9, 9]}
        body["choices"].insert(0, stray)

    [result] = _one_vllm(tiny, spoil)
    assert result.outcome == "accepted"
    assert result.sample.tokens.tolist() == [1, 2, 3, 7, 8]


def _one_vllm(g: RoutingGeometry, spoil: Callable[[Any], Any]) -> list[Any]:
    def handler(path: str, payload: dict[str, Any]) -> bytes:
        body = _answer("vllm", g, payload)
        spoil(body)
        return orjson.dumps(body)

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "vllm", g, params=SamplingParams(2),
                                 transport=MockTransport(handler)) as client:
            return await client.generate(Prompt("p", [1, 2, 3]), samples=1)

    return asyncio.run(go())


def test_a_decoder_or_check_failure_is_a_malformed_verdict(tiny, monkeypatch):
    """Should decoding or checking itself fail, every sample of that answer is rejected as
    malformed, named, and the other answers of the batch keep their results."""
    calls = {"n": 0}
    real = client_module.accept

    def flaky(ws, geometry):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(ws, geometry)

    monkeypatch.setattr(client_module, "accept", flaky)

    def handler(path: str, payload: dict[str, Any]) -> bytes:
        return orjson.dumps(_answer("sglang", tiny, payload))

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(2),
                                 transport=MockTransport(handler), concurrency=1) as client:
            return await client.generate(Prompt("p", [1, 2, 3]), samples=2)

    first, second = asyncio.run(go())
    assert first.sample_id == "p/0" and first.outcome == "rejected"
    assert first.report.kinds == ("malformed",)
    assert "'p/0'" in first.report.message and "RuntimeError: boom" in first.report.message
    assert second.outcome == "accepted"


@pytest.mark.parametrize("version", [True, 1.5, "3", 2**63])
def test_a_wrongly_typed_policy_version_never_reaches_the_writer(tiny, version):
    """A prompt's policy_version that is not an int64 makes its samples malformed verdicts at
    decode, so no such sample is ever handed to a shard writer."""
    def handler(path: str, payload: dict[str, Any]) -> bytes:
        return orjson.dumps(_answer("vllm", tiny, payload))

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "vllm", tiny, params=SamplingParams(2),
                                 transport=MockTransport(handler)) as client:
            return await client.generate(Prompt("p", [1, 2, 3], version), samples=2)

    results = asyncio.run(go())
    assert [r.outcome for r in results] == ["rejected", "rejected"]
    for r in results:
        assert r.report.kinds == ("malformed",) and "policy_version" in r.report.message
        assert r.wire.policy_version is None
