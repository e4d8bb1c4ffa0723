"""Reruns and resumes: ids an earlier run stored are ``already_stored`` (not a fault), rejected
samples are quarantined once however often they are met, and a sample failed in one run and
stored in the next counts once, as stored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from replay_bridge.benchmarks.memory import write_rejected_jsonl
from replay_bridge.benchmarks.traffic import write_sglang_jsonl
from replay_bridge.client import MockTransport, Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.client import TransportError
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, get_protocol
from replay_bridge.shards import Manifest, ShardReader, ShardWriter
from tests.replay_bridge.shards.helpers import run_cli

TINY = "tiny-qwen3-moe"


def ingest_cli(dump: Path, out: Path, *extra: str) -> tuple[int, Any]:
    code, doc, output = run_cli("ingest", dump, "-m", TINY, "-e", "sglang", "-o", out, "--json",
                                *extra)
    assert doc is not None, output
    return code, doc


def test_a_clean_dump_ingested_again_exits_0(tmp_path: Path, tiny: RoutingGeometry) -> None:
    dump = tmp_path / "good.jsonl"
    write_sglang_jsonl(dump, tiny, 6, 8, 8)
    out = tmp_path / "out"
    assert ingest_cli(dump, out)[0] == 0
    code, doc = ingest_cli(dump, out, "--append")  # a rerun, as after a crash
    assert code == 0, doc["totals"]
    assert {tuple(s["kinds"]) for s in doc["samples"]} == {("already_stored",)}
    assert {s["outcome"] for s in doc["samples"]} == {"duplicate"}
    assert len(ShardReader(out)) == 6


def test_an_id_twice_in_one_dump_is_still_a_fault(tmp_path: Path, tiny: RoutingGeometry) -> None:
    dump = tmp_path / "twice.jsonl"
    write_sglang_jsonl(dump, tiny, 2, 8, 8)
    dump.write_bytes(dump.read_bytes() * 2)
    code, doc = ingest_cli(dump, tmp_path / "out")
    assert code == 1
    assert [s["kinds"] for s in doc["samples"]][2:] == [["duplicate_sample_id"]] * 2


def test_rejected_samples_are_quarantined_once_over_reruns(tmp_path: Path,
                                                           tiny: RoutingGeometry) -> None:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_sglang_jsonl(good, tiny, 5, 8, 8)
    write_rejected_jsonl(bad, tiny, 4, 12)
    dump = tmp_path / "mixed.jsonl"
    dump.write_bytes(good.read_bytes() + bad.read_bytes())
    out = tmp_path / "out"
    for run in range(3):
        code, doc = ingest_cli(dump, out, *(["--append"] if run else []))
        assert code == 1  # the dump holds rejected samples: a fault of every run that reads it
        assert doc["totals"]["by_kind"]["all_zero"] == 4
    manifest = Manifest.read(out)  # the dataset: every run's writer
    assert manifest.quarantined == 4
    assert manifest.outcomes == {"stored": 5, "rejected": 4, "failed": 0}
    code, doc, _ = run_cli("validate", out, "--json")
    assert code == 0 and doc["quarantine"]["outcomes"] == {"rejected": 4, "failed": 0}


def _handler(tiny: RoutingGeometry, failing: set[int]) -> Any:
    """SGLang answers; prompts whose first token is in ``failing`` get a non-retryable error."""
    protocol = get_protocol("sglang")

    def handle(path: str, payload: dict[str, Any]) -> bytes:
        ids = payload["input_ids"]
        if ids[0] in failing:
            raise TransportError(f"HTTP 400 from {path}: refused", retryable=False)
        new = int(payload["sampling_params"]["max_new_tokens"])
        out = np.arange(1, new + 1, dtype=np.int32) + ids[0]
        rng = np.random.default_rng(ids[0])
        rows = len(ids) + new - 1
        keys = rng.random((rows, tiny.num_layers, tiny.num_experts))
        routing = np.argsort(keys, axis=-1)[..., :tiny.top_k].astype(np.int32)
        return orjson.dumps(protocol.encode_response(payload, [Completion(out, routing)]))

    return handle


@pytest.mark.parametrize("second_fails", [False, True])
def test_collect_resume_counts_each_sample_once(tmp_path: Path, tiny: RoutingGeometry,
                                                second_fails: bool) -> None:
    prompts = [Prompt(f"p{i}", [10 + i, 2, 3]) for i in range(8)]
    out = tmp_path / "out"

    def run(failing: set[int], resume: bool) -> Any:
        async def go() -> Any:
            writer = ShardWriter(out, tiny, resume=resume, samples_per_shard=3)
            client = RolloutClient("mock://engine", "sglang", tiny, params=SamplingParams(4),
                                   transport=MockTransport(_handler(tiny, failing)))
            async with client:
                summary = await collect(client, prompts, writer)
            writer.close()
            return summary
        return asyncio.run(go())

    first = run({12, 15}, resume=False)
    assert (first.stored, first.failed) == (6, 2)
    second = run({15} if second_fails else set(), resume=True)
    assert second.prompts_skipped == 6
    manifest = Manifest.read(out)  # the dataset: both runs' writers
    failed = 1 if second_fails else 0
    assert manifest.outcomes == {"stored": 8 - failed, "rejected": 0, "failed": failed}
    assert manifest.quarantined == 2  # p5 failing again is not recorded again
    code, doc, _ = run_cli("validate", out, "--json")
    assert code == 0, doc["faults"]
    assert doc["quarantine"]["outcomes"] == {"rejected": 0, "failed": failed}


@pytest.mark.parametrize("version", [True, 1.5])
def test_a_bad_policy_version_past_the_door_never_stops_collect_or_its_resume(
        tmp_path: Path, tiny: RoutingGeometry, version: object) -> None:
    """A prompt whose policy_version is not an int64 (built past the prompt reader): its
    samples get a verdict, the 40 others are stored, and --resume finishes without asking the
    writer to store it again or recording it twice."""
    prompts = [Prompt(f"p{i:02d}", [10 + i, 2, 3]) for i in range(40)]
    prompts.insert(17, Prompt("bad", [9, 2, 3], policy_version=version))  # type: ignore[arg-type]
    out = tmp_path / "out"

    def run(resume: bool) -> Any:
        async def go() -> Any:
            writer = ShardWriter(out, tiny, resume=resume, batch_bytes=1 << 30)
            client = RolloutClient("mock://engine", "sglang", tiny, params=SamplingParams(4),
                                   transport=MockTransport(_handler(tiny, set())))
            async with client:
                summary = await collect(client, prompts, writer, keep_verdicts=True)
            writer.close()
            return summary
        return asyncio.run(go())

    for resume in (False, True):
        summary = run(resume)
        (bad,) = [v for v in summary.verdicts if v["sample_id"] == "bad"]
        assert bad["outcome"] == "rejected" and "policy_version" in bad["message"]
    assert summary.prompts_skipped == 40
    reader = ShardReader(out)
    assert sorted(reader.sample_ids()) == [f"p{i:02d}" for i in range(40)]
    assert [r["sample_id"] for r in reader.quarantined()] == ["bad"]
