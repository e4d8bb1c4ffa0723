"""The client against the reference engine (prefill + decode + router, float32).

Clean runs store every sample with routing equal to a plain transformers forward pass over the
final tokens; each injected fault gets every affected sample rejected with the right kind and
region while the good samples of the same run are stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from replay_bridge.client import Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter

from .conftest import transformers_routing

pytest.importorskip("transformers", reason="the reference engine needs the 'server' extra")

from reference_engine import (  # noqa: E402
    ModelRunner,
    PDUrls,
    in_background,
    serve_app,
    serve_pd,
)

NEW = 8
GEOMETRY = RoutingGeometry.from_preset("tiny-qwen3-moe")
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=1.0, extra={"ignore_eos": True})


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> ModelRunner:
    return ModelRunner(tiny_model, dtype="float32")


@pytest.fixture(scope="module")
def clean_pd(engine: ModelRunner) -> Iterator[PDUrls]:
    with in_background(serve_pd(engine, dtype="float32")) as urls:
        yield urls


def prompts(n: int) -> list[Prompt]:
    rng = np.random.default_rng(7)
    # The first token's parity picks the upstream in the fleet test: alternate it.
    return [Prompt(f"q{i}", [10 + i] + rng.integers(3, 500, 4 + i % 5).tolist())
            for i in range(n)]


def run_collect(url: str, engine_kind: str, items: list[Prompt], out: Path, samples: int = 2,
                concurrency: int = 4) -> Any:
    async def go() -> Any:
        writer = ShardWriter(out, GEOMETRY, samples_per_shard=5)
        async with RolloutClient(url, engine_kind, GEOMETRY, params=PARAMS,
                                 concurrency=concurrency) as client:
            summary = await collect(client, items, writer, samples_per_prompt=samples,
                                    keep_verdicts=True)
        writer.close()
        return summary
    return asyncio.run(go())


def assert_matches_transformers(model_dir: Path, reader: ShardReader, ids: set[str]) -> None:
    assert set(reader.sample_ids()) == ids
    for s in reader:
        ref = transformers_routing(model_dir, s.tokens)
        assert s.rows == s.num_tokens - 1 - s.routed_start
        np.testing.assert_array_equal(s.routed, ref[s.routed_start : s.num_tokens - 1],
                                      err_msg=s.sample_id)


@pytest.mark.parametrize("engine_kind", ["sglang", "sglang-openai"])
def test_clean_pd_run_stores_every_sample_exactly(engine_kind: str, clean_pd: PDUrls,
                                                  tiny_model: Path, tmp_path: Path) -> None:
    items = prompts(6)
    summary = run_collect(clean_pd.router, engine_kind, items, tmp_path / "out")
    assert (summary.samples, summary.stored) == (12, 12), summary.first_rejected
    assert summary.tally.tokens[0] > 0 and summary.tally.bad.sum() == 0
    reader = ShardReader(tmp_path / "out")
    assert_matches_transformers(tiny_model, reader, {f"q{i}/{j}" for i in range(6)
                                                     for j in range(2)})
    for s in reader:  # GRPO group, completion length, log-probs carried through
        assert s.group_id == s.sample_id.split("/")[0] and s.completion_len == NEW
        assert s.logprobs is not None and s.logprobs.shape == (NEW,)
    # The samples of a group are separate draws, not one completion twice.
    assert sum(not np.array_equal(reader[f"q{i}/0"].tokens, reader[f"q{i}/1"].tokens)
               for i in range(6)) >= 5


def test_multi_turn_through_pd_joins_exactly(clean_pd: PDUrls, tiny_model: Path) -> None:
    async def go() -> Any:
        async with RolloutClient(clean_pd.router, "sglang", GEOMETRY, params=PARAMS) as client:
            (first,) = await client.generate(Prompt("conv", [11, 22, 33, 44]))
            second = await client.continue_sample(first.sample, [55, 66, 77])
            third = await client.continue_sample(second.sample, [88])
        return first, second, third

    first, second, third = asyncio.run(go())
    assert first.ok and second.ok and third.ok, (second.report, third.report)
    s = third.sample
    assert s.num_tokens == 4 + NEW + 3 + NEW + 1 + NEW and s.routed_start == 0
    np.testing.assert_array_equal(s.routed, transformers_routing(tiny_model, s.tokens)[:-1])


class Fleet:
    """Sends prompts whose first token is odd to the faulty upstream, the rest to the clean
    one: one node of a fleet gone bad."""

    def __init__(self, clean: str, faulty: str) -> None:
        self.clean, self.faulty = clean, faulty

    def app(self) -> web.Application:
        session: dict[str, aiohttp.ClientSession] = {}

        async def forward(request: web.Request) -> web.Response:
            import orjson

            body = await request.read()
            doc = orjson.loads(body)
            ids = doc.get("input_ids", doc.get("prompt"))
            upstream = self.faulty if ids[0] % 2 else self.clean
            if "s" not in session:
                session["s"] = aiohttp.ClientSession()
            async with session["s"].post(upstream + request.path, data=body,
                                         headers={"Content-Type": "application/json"}) as r:
                return web.Response(status=r.status, body=await r.read(),
                                    content_type="application/json")

        async def close(_: web.Application) -> None:
            if "s" in session:
                await session["s"].close()

        app = web.Application()
        app.router.add_post("/generate", forward)
        app.on_cleanup.append(close)
        return app


FAULTS = {
    # fault: (where, kind, region that holds the bad blocks or None)
    "prefill-zero-rows": ("worker", "all_zero", "prompt"),
    "no-merge": ("router", "all_zero", "prompt"),
    "drop-routed-experts": ("router", "missing_routing", None),
    "duplicate-ids": ("worker", "duplicate_ids", "completion"),
    "extra-row": ("worker", "row_count", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_rejects_affected_samples_and_stores_the_rest(
        fault: str, engine: ModelRunner, clean_pd: PDUrls, tiny_model: Path,
        tmp_path: Path) -> None:
    where, kind, region = FAULTS[fault]
    kw = {"worker_fault": fault} if where == "worker" else {"router_fault": fault}
    items = prompts(6)
    faulty_ids = {f"q{i}/{j}" for i in range(6) for j in range(2) if (10 + i) % 2}
    out = tmp_path / "out"

    with in_background(serve_pd(engine, dtype="float32", **kw)) as faulty, \
            in_background(serve_app(Fleet(clean_pd.router, faulty.router).app())) as url:
        summary = run_collect(url, "sglang", items, out)

    rejected = {v["sample_id"] for v in summary.verdicts if not v["stored"]}
    assert rejected == faulty_ids
    assert summary.failed == 0 and summary.by_kind == {kind: len(faulty_ids)}
    reader = ShardReader(out)
    assert_matches_transformers(tiny_model, reader, {v["sample_id"] for v in summary.verdicts}
                                - faulty_ids)
    records = {r["sample_id"]: r for r in reader.quarantined()}
    assert set(records) == faulty_ids
    for sid, rec in records.items():
        assert rec["kinds"] == [kind], rec["message"]
        if region is None:
            continue
        blocks = rec["report"]["blocks"][kind]
        other = "completion" if region == "prompt" else "prompt"
        assert blocks[region] > 0 and blocks[other] == 0, (sid, blocks)
        assert blocks["layers"] == [0, 1, 2, 3]  # every MoE layer
        if kind == "all_zero":  # PR #23885: every prompt position, every layer
            prompt_rows = rec["report"]["rows"] - (NEW - 1)
            assert blocks["prompt"] == prompt_rows * GEOMETRY.num_moe_layers


def test_chat_prompts_through_pd(clean_pd: PDUrls, tiny_model: Path, tmp_path: Path) -> None:
    """/v1/chat/completions: the server applies the chat template; the prompt's token ids come
    back with the answer and the routing covers them."""
    messages = [{"role": "user", "content": "which experts did you use?"}]
    items = [Prompt("chat0", messages=messages), Prompt("chat1", messages=messages[:1] * 2)]

    async def go() -> Any:
        writer = ShardWriter(tmp_path / "out", GEOMETRY)
        async with RolloutClient(clean_pd.router, "sglang-openai", GEOMETRY, params=PARAMS) as c:
            summary = await collect(c, items, writer, samples_per_prompt=2, keep_verdicts=True)
        writer.close()
        return summary

    summary = asyncio.run(go())
    assert summary.stored == 4, summary.first_rejected
    reader = ShardReader(tmp_path / "out")
    assert_matches_transformers(tiny_model, reader, {"chat0/0", "chat0/1", "chat1/0", "chat1/1"})
    assert reader["chat1/0"].prompt_len > reader["chat0/0"].prompt_len > 5
