"""One answer that makes decoding, checking or storing raise is a verdict for its samples: the
run goes on, every other sample is stored, and `collect` exits 1 (not 2, not a traceback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.client import MockTransport, Prompt, RolloutClient, SamplingParams, collect
from replay_bridge.client import _client
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import get_protocol
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import ShardReader, ShardWriter
from tests.support.processes import loopback_responder

from .test_transport import answer

BAD = 77  # the first token of the prompt whose answer breaks things


def raising_decode(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Make the protocol's decoder raise (as a bug or an unforeseen value would) for the
    answer to a prompt that starts with BAD."""
    protocol = get_protocol(engine)
    decode = protocol.decode

    def decode_or_raise(request: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if request["input_ids"][0] == BAD:
            raise TypeError("'int' object is not subscriptable")
        return decode(request, *args, **kwargs)

    monkeypatch.setattr(protocol, "decode", decode_or_raise)


def run_collect(tiny: RoutingGeometry, writer: ShardWriter, firsts: list[int]) -> Any:
    mock = MockTransport(lambda path, p: answer("sglang", tiny, p))

    async def go() -> Any:
        async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(3),
                                 concurrency=2, transport=mock) as client:
            return await collect(client, [Prompt(f"g{i}", [f, 5, 6]) for i, f in
                                          enumerate(firsts)], writer, keep_verdicts=True)

    return asyncio.run(go())


def test_a_decoder_that_raises_rejects_that_sample_only(tiny: RoutingGeometry, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    raising_decode(monkeypatch, "sglang")
    with ShardWriter(tmp_path / "o", tiny) as writer:
        summary = run_collect(tiny, writer, [1, 2, BAD, 3, 4])
    assert (summary.stored, summary.rejected, summary.failed) == (4, 1, 0)
    (bad,) = [v for v in summary.verdicts if not v["stored"]]
    assert bad["sample_id"] == "g2" and bad["outcome"] == "rejected"
    assert bad["kinds"] == ["malformed"]
    assert "'g2'" in bad["message"] and "TypeError" in bad["message"]
    with ShardReader(tmp_path / "o") as reader:
        assert sorted(reader.sample_ids()) == ["g0", "g1", "g3", "g4"]
        (record,) = reader.quarantined()
        assert record["sample_id"] == "g2" and record["kinds"] == ["malformed"]


def test_a_check_that_raises_rejects_that_sample_only(tiny: RoutingGeometry, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    accept = _client.accept

    def accept_or_raise(sample: Any, geometry: RoutingGeometry) -> Any:
        if sample.sample_id == "g1":
            raise ValueError("cannot convert float NaN to integer")
        return accept(sample, geometry)

    monkeypatch.setattr(_client, "accept", accept_or_raise)
    with ShardWriter(tmp_path / "o", tiny) as writer:
        summary = run_collect(tiny, writer, [1, 2, 3])
    assert (summary.stored, summary.rejected) == (2, 1)
    (bad,) = [v for v in summary.verdicts if not v["stored"]]
    assert bad["sample_id"] == "g1" and bad["kinds"] == ["malformed"]
    assert "ValueError" in bad["message"]


class _BrokenWriter(ShardWriter):
    """Raises what a storage library might (not an UnstorableSample) for one sample."""

    def claim(self, sample: RoutedSample) -> RoutedSample:
        if sample.sample_id == "g0":
            raise TypeError("Expected bytes, got a 'bool' object")
        return super().claim(sample)


def test_a_store_that_raises_quarantines_that_sample_as_unstorable(
        tiny: RoutingGeometry, tmp_path: Path) -> None:
    with _BrokenWriter(tmp_path / "o", tiny) as writer:
        summary = run_collect(tiny, writer, [1, 2, 3])
    assert (summary.stored, summary.rejected, summary.failed) == (2, 1, 0)
    (bad,) = [v for v in summary.verdicts if not v["stored"]]
    assert bad["sample_id"] == "g0" and bad["kinds"] == ["unstorable"]
    assert "TypeError" in bad["message"]
    with ShardReader(tmp_path / "o") as reader:
        assert sorted(reader.sample_ids()) == ["g1", "g2"]
        assert reader.manifest.outcomes == {"stored": 2, "rejected": 1, "failed": 0}


class _FullDisk(ShardWriter):
    def append(self, sample: RoutedSample) -> None:
        raise OSError(28, "No space left on device")


def test_a_disk_fault_still_stops_the_run(tiny: RoutingGeometry, tmp_path: Path) -> None:
    """The guard is for one sample's data; the writer's own faults end the run."""
    writer = _FullDisk(tmp_path / "o", tiny)
    with pytest.raises(OSError, match="No space left"):
        run_collect(tiny, writer, [1, 2, 3])


@pytest.fixture(scope="module")
def responder() -> Iterator[str]:
    with loopback_responder("sglang") as url:
        yield url


def test_cli_collect_exits_1_with_a_verdict_for_the_broken_answer(
        responder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raising_decode(monkeypatch, "sglang")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "input_ids": [f, 2, 3]}) + "\n"
                               for i, f in enumerate([1, BAD, 2, 3])))
    result = CliRunner().invoke(command_line(), [
        "collect", "--endpoint", responder, "--engine", "sglang", "--prompts", str(prompts),
        "--model", "tiny-qwen3-moe", "--out", str(tmp_path / "o"), "--max-new-tokens", "3",
        "--concurrency", "2", "--json"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert (doc["totals"]["stored"], doc["totals"]["rejected"]) == (3, 1)
    by_id = {s["sample_id"]: s for s in doc["samples"]}
    assert by_id["p1"]["kinds"] == ["malformed"] and "TypeError" in by_id["p1"]["message"]
    assert all(by_id[p]["stored"] for p in ("p0", "p2", "p3"))


@pytest.mark.parametrize("concurrency", [1, 2, 8])
def test_a_failing_store_worker_ends_the_run_instead_of_hanging(
        concurrency: int, tiny: RoutingGeometry, tmp_path: Path) -> None:
    """The store worker dies (here: the progress callback) while the producers are done and
    the queue is full: collect raises the worker's error, it never waits on the queue."""
    mock = MockTransport(lambda path, p: answer("sglang", tiny, p))
    calls = 0

    def on_result(summary: Any, results: list[Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ValueError("progress bar broke")

    async def go(writer: ShardWriter) -> Any:
        async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(3),
                                 concurrency=concurrency, transport=mock) as client:
            run = collect(client, [Prompt(f"h{i}", [1 + i, 5, 6]) for i in range(5)], writer,
                          on_result=on_result)
            return await asyncio.wait_for(run, 30)  # a hang fails here, not the whole suite

    with ShardWriter(tmp_path / "o", tiny) as writer, \
            pytest.raises(ValueError, match="progress bar broke"):
        asyncio.run(go(writer))
    with ShardReader(tmp_path / "o") as reader:
        assert len(reader.sample_ids()) >= 2  # what was stored before is sealed
