"""Collecting through SGLang's own router (sglang-router 0.3.2 ``--mini-lb``) in front of the
reference prefill/decode pair: it returns decode's response unmerged, so every sample's prompt
rows are decode's zeros. The client must reject every sample as ``all_zero`` at prompt
positions only, every MoE layer, and store none. Needs ``.venv-sglang-router``
(``scripts/sglang_router_env.sh``; ``make test`` makes it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from replay_bridge.client import Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter

from tests.support.processes import REQUIRES_SGLANG_ROUTER, sglang_mini_lb

pytestmark = REQUIRES_SGLANG_ROUTER

GEOMETRY = RoutingGeometry.from_preset("tiny-qwen3-moe")
NEW = 6


@pytest.fixture(scope="module")
def mini_lb(tiny_model: Path) -> Iterator[str]:
    from reference_engine import ModelRunner, in_background, serve_pd

    with in_background(serve_pd(ModelRunner(tiny_model, dtype="float32"), dtype="float32")) as pd:
        with sglang_mini_lb(pd.prefill, pd.decode) as url:
            yield url


def test_unmerged_prompt_rows_rejected_through_sglang_router(mini_lb: str, tmp_path: Path):
    items = [Prompt(f"m{i}", [20 + i, 7, 300, 41, 5 + i][: 3 + i % 3]) for i in range(4)]

    async def go():  # noqa: ANN202
        writer = ShardWriter(tmp_path / "out", GEOMETRY)
        params = SamplingParams(max_new_tokens=NEW, extra={"ignore_eos": True})
        async with RolloutClient(mini_lb, "sglang", GEOMETRY, params=params) as client:
            summary = await collect(client, items, writer, samples_per_prompt=2,
                                    keep_verdicts=True)
        writer.close()
        return summary

    summary = asyncio.run(go())
    assert summary.samples == 8 and summary.stored == 0 and summary.failed == 0
    assert summary.by_kind == {"all_zero": 8}
    reader = ShardReader(tmp_path / "out")
    assert len(reader) == 0
    for rec in reader.quarantined():
        blocks = rec["report"]["blocks"]["all_zero"]
        prompt_rows = rec["report"]["rows"] - (NEW - 1)
        assert blocks["prompt"] == prompt_rows * GEOMETRY.num_moe_layers
        assert blocks["completion"] == 0 and blocks["layers"] == [0, 1, 2, 3]
