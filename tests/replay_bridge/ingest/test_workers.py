"""``ingest(workers=N)`` / ``ingest --workers N``: the same verdicts, tally and stored routing
as one process, an id never stored twice across workers, line numbers of the whole file in
messages, appends, and a failing worker that stops the run without losing what was stored."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.ingest import ingest, iter_lines, line_ranges
from replay_bridge.shards import ShardError, ShardReader, validate_dataset
from tests.replay_bridge.protocols.engines import routing, sglang_generate

runner = CliRunner()


def _line(sid: str, req: dict, body: bytes) -> bytes:
    return orjson.dumps({"sample_id": sid, "request": req, "response": orjson.loads(body)})


def _dump(path: Path, tiny, rng, n: int = 40) -> dict[str, np.ndarray]:
    """``n`` good samples with, spread over the file, bad lines of every sort and ids that
    repeat far apart (so in different workers' ranges); the routing of each good id."""
    lines, routings = [], {}
    for i in range(n):
        r = routing(rng, 6, tiny)
        req, body = sglang_generate([1, 2, 3, i], [4, 5, 6], r)
        lines.append(_line(f"s{i:03d}", req, body))
        routings[f"s{i:03d}"] = r
    bad_r = routing(rng, 6, tiny)
    bad_r[2, 0, 1] = bad_r[2, 0, 0]  # a block naming one expert twice
    req, body = sglang_generate([9, 9, 9, 9], [4, 5, 6], bad_r)
    lines.insert(5, _line("dup-ids", req, body))
    lines.insert(12, b"{broken json")
    lines.insert(30, b"[1, 2]")
    lines.insert(33, b"   ")
    lines.append(lines[3])   # s003 again, near the end
    lines.append(lines[-3])  # the last good id again
    path.write_bytes(b"\n".join(lines) + b"\n")
    return routings


def test_line_ranges_cut_at_line_starts_and_cover_the_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"a\nbb\n\nccc\ndddd\ne")
    data = path.read_bytes()
    for parts in (1, 2, 3, 5, 50):
        ranges = line_ranges(path, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) <= parts
        assert all(a < b for a, b in ranges)
        assert all(p[1] == q[0] for p, q in zip(ranges, ranges[1:]))
        assert all(data[a - 1:a] == b"\n" for a, _ in ranges[1:])
        lines = [data[s:e] for a, b in ranges for _, _, s, e in iter_lines(path, a, b)]
        assert lines == [x for x in data.split(b"\n") if x.strip()]
    (tmp_path / "empty").write_bytes(b"")
    assert line_ranges(tmp_path / "empty", 4) == []


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_match_one_process(tmp_path, tiny, rng, workers):
    path = tmp_path / "t.jsonl"
    routings = _dump(path, tiny, rng)
    one = ingest(path, tiny, "sglang", tmp_path / "one")
    progress: list[tuple[int, int]] = []
    many = ingest(path, tiny, "sglang", tmp_path / "many", workers=workers,
                  on_line=lambda lines, done: progress.append((lines, done)))
    assert many.totals() == one.totals()
    assert many.tally.to_dict() == one.tally.to_dict()

    # verdicts in file order, the same but for which copy of a repeated id is the stored one
    def key(v):
        kept = v["outcome"] in ("stored", "duplicate")
        return v["sample_id"], "stored or duplicate" if kept else (v["outcome"], v["kinds"])
    assert [key(v) for v in many.samples] == [key(v) for v in one.samples]
    outcomes = Counter((v["sample_id"], v["outcome"]) for v in many.samples)
    assert outcomes[("s003", "stored")] == 1 and outcomes[("s003", "duplicate")] == 1
    assert [v["kinds"] for v in many.samples if v["outcome"] == "duplicate"] == [
        ["duplicate_sample_id"]] * 2
    malformed = [v for v in many.samples if v["kinds"] == ["malformed"]]
    assert [v["sample_id"] for v in malformed] == ["line-13", "line-31"]  # the whole file's
    assert "line 31 is a list, not a JSON object" in malformed[1]["message"]

    reader = ShardReader(tmp_path / "many")
    assert len(reader.manifests) == len(line_ranges(path, workers))  # a writer per worker
    assert sorted(reader.sample_ids()) == sorted(routings)
    assert reader.duplicates == []
    for sid, r in routings.items():
        np.testing.assert_array_equal(reader.routing(sid), r)
    assert {q["sample_id"] for q in reader.quarantined()} == {"dup-ids", "line-13", "line-31"}
    report = validate_dataset(tmp_path / "many")
    assert report.ok, report.faults
    assert progress[-1] == (one.lines, path.stat().st_size)
    assert [d for _, d in progress] == sorted(d for _, d in progress)


def test_workers_append_and_refuse_a_dataset_without_append(tmp_path, tiny, rng):
    path = tmp_path / "t.jsonl"
    routings = _dump(path, tiny, rng)
    out = tmp_path / "out"
    first = ingest(path, tiny, "sglang", out, workers=2)
    with pytest.raises(ShardError, match="already holds a dataset"):
        ingest(path, tiny, "sglang", out, workers=2)
    again = ingest(path, tiny, "sglang", out, workers=2, append=True)
    assert again.stored == 0
    kinds = Counter(tuple(v["kinds"]) for v in again.samples)
    assert kinds[("already_stored",)] == len(routings) + 2  # the repeats too: stored earlier
    assert again.faults == first.faults - 2  # no new faults but the bad lines' own
    assert sorted(ShardReader(out).sample_ids()) == sorted(routings)


def test_a_failing_worker_stops_the_run_with_its_error(tmp_path, tiny, rng):
    path = tmp_path / "t.jsonl"
    _dump(path, tiny, rng)
    with pytest.raises(RuntimeError, match="ingest worker .*ValueError.*compression"):
        ingest(path, tiny, "sglang", tmp_path / "out", workers=2,
               writer_options={"compression": "no-such-codec"})


def test_writer_ids_are_numbered_per_worker(tmp_path, tiny, rng):
    path = tmp_path / "t.jsonl"
    _dump(path, tiny, rng)
    ingest(path, tiny, "sglang", tmp_path / "out", workers=2,
           writer_options={"writer_id": "host7"})
    assert sorted(m.writer for m in ShardReader(tmp_path / "out").manifests) == [
        "host7-0", "host7-1"]


def test_cli_workers_json(tmp_path, tiny, rng):
    path = tmp_path / "t.jsonl"
    routings = _dump(path, tiny, rng)
    res = runner.invoke(command_line(), ["ingest", str(path), "-m", "tiny-qwen3-moe",
                                         "-e", "sglang", "-o", str(tmp_path / "out"),
                                         "--workers", "2", "--json"])
    assert res.exit_code == 1, res.output  # bad lines are faults
    doc = orjson.loads(res.stdout)
    assert doc["workers"] == 2 and doc["totals"]["stored"] == len(routings)
    assert len(ShardReader(tmp_path / "out").manifests) == 2


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (3, 1), (5, 2), (16, 8), (64, 8)])
def test_default_workers_is_one_per_two_cpus_at_most_8(monkeypatch, cpus, expected):
    import replay_bridge.ingest as ingest_module

    monkeypatch.setattr(ingest_module.os, "sched_getaffinity", lambda pid: set(range(cpus)),
                        raising=False)
    assert ingest_module.default_workers() == expected


def test_workers_0_picks_the_default_and_reports_it(tmp_path, tiny, rng, monkeypatch):
    import replay_bridge.ingest as ingest_module

    path = tmp_path / "t.jsonl"
    _dump(path, tiny, rng)
    monkeypatch.setattr(ingest_module, "default_workers", lambda: 2)
    result = ingest(path, tiny, "sglang", tmp_path / "lib", workers=0)
    assert result.workers == 2 and len(ShardReader(tmp_path / "lib").manifests) == 2
    res = runner.invoke(command_line(), ["ingest", str(path), "-m", "tiny-qwen3-moe",
                                         "-e", "sglang", "-o", str(tmp_path / "cli"),
                                         "--workers", "0", "--json"])
    assert orjson.loads(res.stdout)["workers"] == 2, res.output
    one = ingest(path, tiny, "sglang", tmp_path / "one")
    assert one.workers == 1
