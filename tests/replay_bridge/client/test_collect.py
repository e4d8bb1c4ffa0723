"""collect(): every sample's outcome in the shard directory, resume, backpressure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from replay_bridge.client import Prompt, RetryPolicy, RolloutClient, SamplingParams, collect
from reference_engine.loopback import loopback_app, synthetic_routing
from replay_bridge.geometry import GeometryMismatch, RoutingGeometry
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import Manifest, ShardReader, ShardWriter, UnstorableSample

from .conftest import loopback_client, running

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01, max_elapsed=0.0)
FAIL_TOKEN, DROP_TOKEN = 999, 998


def faulty_app(engine: str, tiny: RoutingGeometry) -> web.Application:
    """The light responder, except: prompts starting with FAIL_TOKEN get 503 every time, and
    answers to prompts starting with DROP_TOKEN lose their routing."""
    app = loopback_app(engine, tiny)

    @web.middleware
    async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        ids = body.get("input_ids", body.get("prompt"))
        if ids[0] == FAIL_TOKEN:
            return web.Response(status=503, text="overloaded")
        resp = await handler(request)
        if ids[0] == DROP_TOKEN:
            doc = orjson.loads(resp.body)
            if engine == "vllm":
                for c in doc["choices"]:
                    c.pop("routed_experts")
            else:
                doc["meta_info"].pop("routed_experts")
            return web.json_response(doc)
        return resp

    app.middlewares.append(faults)
    return app


def prompts(n: int, special: dict[int, int] | None = None) -> list[Prompt]:
    special = special or {}
    return [Prompt(f"q{i:03d}", [special.get(i, 1 + i % 50), 2, 3, 4 + i]) for i in range(n)]


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_outcome_recorded(engine: str, tiny: RoutingGeometry, tmp_path: Path) -> None:
    ps = prompts(20, {3: FAIL_TOKEN, 7: DROP_TOKEN})

    async def go() -> Any:
        async with running(faulty_app(engine, tiny)) as url:
            writer = ShardWriter(tmp_path / "out", tiny, samples_per_shard=7)
            async with RolloutClient(url, engine, tiny, params=SamplingParams(5), retry=FAST,
                                     concurrency=4) as client:
                summary = await collect(client, ps, writer, samples_per_prompt=2,
                                        keep_verdicts=True)
            writer.close()
            return summary

    summary = asyncio.run(go())
    bad = {"q003/0", "q003/1", "q007/0", "q007/1"}
    assert (summary.samples, summary.stored, summary.rejected, summary.failed) == (40, 36, 2, 2)
    assert summary.by_kind == {"missing_routing": 2}
    verdicts = {v["sample_id"]: v for v in summary.verdicts}
    assert len(verdicts) == 40
    assert verdicts["q007/1"]["kinds"] == ["missing_routing"]
    assert verdicts["q003/0"]["outcome"] == "failed" and "HTTP 503" in verdicts["q003/0"]["message"]
    assert all(v["stored"] for sid, v in verdicts.items() if sid not in bad)

    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == sorted(set(verdicts) - bad)
    for s in reader:
        assert s.group_id == s.sample_id.split("/")[0]
        np.testing.assert_array_equal(s.routed, synthetic_routing(s.tokens, tiny))
    assert Manifest.read(tmp_path / "out").outcomes == {"stored": 36, "rejected": 2, "failed": 2}
    quarantined = {r["sample_id"]: r for r in reader.quarantined()}
    assert set(quarantined) == bad
    assert quarantined["q007/0"]["kinds"] == ["missing_routing"]
    assert quarantined["q003/1"]["outcome"] == "failed"
    assert "gave up after 3 attempts" in quarantined["q003/1"]["message"]


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_resume_asks_only_for_what_is_missing(engine: str, tiny: RoutingGeometry,
                                              tmp_path: Path) -> None:
    ps = prompts(12)
    out = tmp_path / "out"

    async def run(items: list[Prompt], resume: bool) -> tuple[Any, list[dict[str, Any]]]:
        writer = ShardWriter(out, tiny, samples_per_shard=4, resume=resume)
        async with loopback_client(engine, tiny, params=SamplingParams(3)) as (client, bodies):
            summary = await collect(client, items, writer, samples_per_prompt=3)
        writer.close()
        return summary, bodies

    first, _ = asyncio.run(run(ps[:5], resume=False))
    assert first.stored == 15
    # A partly stored group: q005/1 only (as if the run had died in the middle of it).
    with ShardWriter(out, tiny, resume=True) as w:
        (r,) = [s for s in _generate(engine, tiny, Prompt("q005", ps[5].input_ids), 3)
                if s.sample_id == "q005/1"]
        w.add(r)
    second, bodies = asyncio.run(run(ps, resume=True))
    assert second.prompts == 12 and second.prompts_skipped == 5
    assert second.stored == 12 * 3 - 15 - 1
    asked = [b.get("input_ids", b.get("prompt"))[3] - 4 for b in bodies]
    assert set(asked) == set(range(5, 12))  # stored prompts were never asked for again
    if engine == "vllm":
        assert [b["n"] for b in bodies if b["prompt"][3] == 9] == [2]
    reader = ShardReader(out)
    ids = reader.sample_ids()
    assert len(ids) == len(set(ids)) == 36


def _generate(engine: str, tiny: RoutingGeometry, prompt: Prompt, n: int) -> list[Any]:
    async def go() -> list[Any]:
        async with loopback_client(engine, tiny, params=SamplingParams(3)) as (client, _):
            return [r.sample for r in await client.generate(prompt, samples=n)]
    return asyncio.run(go())


class BlockingWriter(ShardWriter):
    """A ShardWriter whose append() waits for a gate: a disk that has stalled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def append(self, sample: Any) -> None:
        self.entered.set()
        self.gate.wait(30)
        super().append(sample)


def test_backpressure_bounds_requests_while_the_writer_stalls(tiny: RoutingGeometry,
                                                              tmp_path: Path) -> None:
    concurrency, queue_size = 4, 2

    async def go() -> None:
        writer = BlockingWriter(tmp_path / "out", tiny)
        async with loopback_client("sglang", tiny, params=SamplingParams(2),
                                   concurrency=concurrency) as (client, bodies):
            task = asyncio.ensure_future(collect(client, prompts(200), writer,
                                                 queue_size=queue_size))
            await asyncio.get_running_loop().run_in_executor(None, writer.entered.wait, 10)
            await asyncio.sleep(0.3)  # plenty of time to run ahead, were it allowed to
            asked_while_stalled = len(bodies)
            writer.gate.set()
            summary = await task
        # One answer in the stalled store, queue_size queued, one per worker waiting to queue.
        assert asked_while_stalled <= 1 + queue_size + concurrency
        assert summary.stored == 200 and len(bodies) == 200
        writer.close()
    asyncio.run(go())


def test_a_writer_of_another_geometry_is_refused_before_anything_is_sent(
        tiny: RoutingGeometry, tmp_path: Path) -> None:
    wider = RoutingGeometry(tiny.num_layers, tiny.moe_layers, tiny.top_k + 1, tiny.num_experts)

    async def go() -> list[dict[str, Any]]:
        writer = ShardWriter(tmp_path / "out", wider)
        async with loopback_client("sglang", tiny, params=SamplingParams(3)) as (client, bodies):
            with pytest.raises(GeometryMismatch, match="top_k: 3 vs 2"):
                await collect(client, prompts(3), writer)
        writer.close()
        return bodies

    assert asyncio.run(go()) == []
    assert len(ShardReader(tmp_path / "out")) == 0


class _RefusingWriter(ShardWriter):
    """Refuses one sample id as unstorable (as it would a routing that does not fit)."""

    def claim(self, sample: RoutedSample) -> RoutedSample:
        if sample.sample_id == "q001":
            raise UnstorableSample(f"sample {sample.sample_id!r}: routing does not fit",
                                   sample_id=sample.sample_id)
        return super().claim(sample)


def test_a_sample_the_writer_refuses_is_unstorable_not_a_duplicate(tiny: RoutingGeometry,
                                                                   tmp_path: Path) -> None:
    """A sample the checks accept but the writer refuses is quarantined as ``unstorable`` with
    the writer's message; the others are stored."""

    async def go() -> Any:
        writer = _RefusingWriter(tmp_path / "out", tiny)
        async with loopback_client("sglang", tiny, params=SamplingParams(3)) as (client, _):
            summary = await collect(client, prompts(3), writer, keep_verdicts=True)
        writer.close()
        return summary

    summary = asyncio.run(go())
    assert (summary.stored, summary.rejected, summary.failed) == (2, 1, 0)
    assert summary.by_kind == {"unstorable": 1}
    (refused,) = [v for v in summary.verdicts if v["sample_id"] == "q001"]
    assert refused["outcome"] == "rejected" and refused["kinds"] == ["unstorable"]
    assert "routing does not fit" in refused["message"]
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == ["q000", "q002"]
    (record,) = reader.quarantined()
    assert record["sample_id"] == "q001" and record["kinds"] == ["unstorable"]
    assert reader.manifest.outcomes == {"stored": 2, "rejected": 1, "failed": 0}


def test_a_repeated_id_is_a_duplicate(tiny: RoutingGeometry, tmp_path: Path) -> None:
    ps = prompts(2)
    ps = [ps[0], ps[1], Prompt("q000", ps[0].input_ids)]

    async def go() -> Any:
        writer = ShardWriter(tmp_path / "out", tiny)
        async with loopback_client("sglang", tiny, params=SamplingParams(3),
                                   concurrency=1) as (client, _):
            summary = await collect(client, ps, writer, keep_verdicts=True)
        writer.close()
        return summary

    summary = asyncio.run(go())
    assert [(v["sample_id"], v["outcome"], v["kinds"]) for v in summary.verdicts] == [
        ("q000", "stored", []), ("q001", "stored", []),
        ("q000", "duplicate", ["duplicate_sample_id"])]
    assert (summary.stored, summary.rejected, summary.failed) == (2, 1, 0)
    assert summary.by_kind == {"duplicate_sample_id": 1}
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == ["q000", "q001"] and list(reader.quarantined()) == []
