"""ingest and collect store through the same sink: the same engine answers give the same
verdicts, the same shards and the same quarantine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from reference_engine import serve_app
from replay_bridge.client import Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from replay_bridge.shards import ShardReader, ShardWriter
from tests.replay_bridge.protocols.engines import routing, sglang_generate


def answers(tiny: RoutingGeometry) -> list[tuple[str, list[int], dict[str, Any], bytes]]:
    """``(prompt id, input ids, request, answer)``: good, all-zero prompt rows, no routing, and
    the first prompt's id once more."""
    rng = np.random.default_rng(7)
    out: list[tuple[str, list[int], dict[str, Any], bytes]] = []
    for pid, prompt, kind in [("a", [1, 2, 3], "good"), ("b", [4, 5, 6], "zero"),
                              ("c", [7, 8, 9], "none"), ("a", [1, 2, 4], "good")]:
        r = routing(rng, len(prompt) + 3 - 1, tiny)
        if kind == "zero":
            r[:2] = 0
        req, body = sglang_generate(prompt, [10, 11, 12], None if kind == "none" else r)
        out.append((pid, prompt, req, body))
    return out


def canned_engine(table: list[tuple[str, list[int], dict[str, Any], bytes]]) -> web.Application:
    by_prompt = {tuple(prompt): body for _, prompt, _, body in table}

    async def generate(request: web.Request) -> web.Response:
        ids = orjson.loads(await request.read())["input_ids"]
        return web.Response(body=by_prompt[tuple(ids)], content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", generate)
    return app


def test_ingest_and_collect_give_the_same_verdicts(tiny: RoutingGeometry,
                                                   tmp_path: Path) -> None:
    table = answers(tiny)
    dump = tmp_path / "traffic.jsonl"
    dump.write_bytes(b"".join(
        orjson.dumps({"sample_id": pid, "group_id": pid, "request": req,
                      "response": orjson.loads(body)}) + b"\n"
        for pid, _, req, body in table))
    ingested = ingest(dump, tiny, "sglang", tmp_path / "ingested")

    async def go() -> Any:
        writer = ShardWriter(tmp_path / "collected", tiny)
        async with serve_app(canned_engine(table)) as url, \
                RolloutClient(url, "sglang", tiny, params=SamplingParams(3),
                              concurrency=1) as client:
            summary = await collect(client, [Prompt(pid, prompt) for pid, prompt, _, _ in table],
                                    writer, keep_verdicts=True)
        writer.close()
        return summary

    collected = asyncio.run(go())
    assert [(v["outcome"], v["kinds"]) for v in ingested.samples] == [
        ("stored", []), ("rejected", ["all_zero"]), ("rejected", ["missing_routing"]),
        ("duplicate", ["duplicate_sample_id"])]
    assert collected.verdicts == ingested.samples
    assert collected.totals()["by_kind"] == ingested.totals()["by_kind"]
    assert (collected.stored, collected.rejected) == (ingested.stored, ingested.rejected)

    a, b = ShardReader(tmp_path / "ingested"), ShardReader(tmp_path / "collected")
    assert a.sample_ids() == b.sample_ids() == ["a"]
    np.testing.assert_array_equal(a["a"].routed, b["a"].routed)
    assert a.manifest.outcomes == b.manifest.outcomes == {"stored": 1, "rejected": 2,
                                                         "failed": 0}

    def records(reader: ShardReader) -> list[tuple[str, list[str], str]]:
        return [(r["sample_id"], r["kinds"], r["message"]) for r in reader.quarantined()]

    assert records(a) == records(b)
