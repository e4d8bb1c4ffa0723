"""Offline ingest: engine traffic -> shards + quarantine, through the CLI and the library."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from replay_bridge.shards import ShardReader
from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion
from tests.support.processes import ROOT

EXAMPLE = ROOT / "examples" / "traffic" / "sglang-pd.jsonl"
runner = CliRunner()


def _line(sid: str, req: dict, body: bytes, **extra) -> bytes:
    return orjson.dumps({"sample_id": sid, "request": req, "response": orjson.loads(body),
                         **extra})


def test_example_traffic_cli_json(tmp_path):
    out = tmp_path / "shards"
    res = runner.invoke(command_line(), ["ingest", str(EXAMPLE), "--model", "tiny-qwen3-moe",
                              "--engine", "sglang", "--out", str(out), "--json"])
    assert res.exit_code == 1, res.output
    doc = orjson.loads(res.stdout)
    verdicts = {s["sample_id"]: s for s in doc["samples"]}
    assert len(verdicts) == 24 and doc["totals"]["stored"] == 18
    assert verdicts["prompt1-1"]["kinds"] == ["all_zero"]  # PR #23885 prompt rows
    assert verdicts["prompt3-2"]["kinds"] == ["duplicate_ids"]
    assert verdicts["prompt4-1"]["kinds"] == ["missing_routing"]
    assert verdicts["prompt5-0"]["kinds"] == ["malformed"]
    assert verdicts["prompt5-2"]["kinds"] == ["row_count"]
    assert all(v["stored"] == (not v["kinds"]) for v in verdicts.values())
    zero = doc["check"]["regions"]
    assert zero["prompt"]["all_zero_blocks"] > 0 and zero["completion"]["all_zero_blocks"] == 0
    reader = ShardReader(out)
    assert sorted(reader.sample_ids()) == sorted(k for k, v in verdicts.items() if v["stored"])
    quarantined = {r["sample_id"]: r for r in reader.quarantined()}
    assert set(quarantined) == {k for k, v in verdicts.items() if not v["stored"]}
    assert quarantined["prompt1-1"]["kinds"] == ["all_zero"]


GEOMETRIES = {
    "dense-prefix": RoutingGeometry(5, (2, 3, 4), 4, 64),
    "256": RoutingGeometry(3, (0, 1, 2), 8, 256),
    "300": RoutingGeometry(3, (0, 1, 2), 8, 300),
    "top1": RoutingGeometry(4, (0, 1, 2, 3), 1, 16),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("engine", ["sglang", "sglang-openai", "vllm"])
def test_round_trip_every_engine(tmp_path, rng, name, engine):
    """engine encoding -> ingest -> shard -> reader gives back the identical routing."""
    g = GEOMETRIES[name]
    expected: dict[str, tuple[list[int], np.ndarray]] = {}
    lines = []
    for i in range(6):
        prompt = rng.integers(0, 900, int(rng.integers(2, 12))).tolist()
        start = int(rng.integers(0, len(prompt) + 1)) if engine != "sglang-openai" else 0
        if engine == "vllm":
            outs = [rng.integers(0, 900, int(rng.integers(1, 6))).tolist() for _ in range(2)]
            rs = [routing(rng, len(prompt) + len(o) - 1 - start, g) for o in outs]
            req, body = vllm_completion(prompt, outs, rs, str(g.id_dtype), start=start)
            for j, (o, r) in enumerate(zip(outs, rs)):
                expected[f"p{i}/{j}"] = (prompt + o, r)
        else:
            out = rng.integers(0, 900, int(rng.integers(1, 6))).tolist()
            r = routing(rng, len(prompt) + len(out) - 1 - start, g)
            req, body = sglang_generate(prompt, out, r, start=start)
            if engine == "sglang-openai":
                meta = orjson.loads(body)["meta_info"]
                req = {"prompt": prompt}
                body = orjson.dumps({"choices": [{"index": 0, "token_ids": out,
                                                  "finish_reason": "stop"}],
                                     "sglext": {"routed_experts": meta["routed_experts"]}})
            expected[f"p{i}"] = (prompt + out, r)
        lines.append(_line(f"p{i}", req, body, group_id=f"g{i % 2}", policy_version=3))
    path = tmp_path / "traffic.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = ingest(path, g, engine, tmp_path / "out")
    assert result.rejected == 0, result.samples
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == sorted(expected)
    for sid, (tokens, r) in expected.items():
        s = reader[sid]
        assert s.tokens.tolist() == tokens
        assert s.routed.dtype == g.id_dtype
        np.testing.assert_array_equal(s.routed, r[:, list(g.moe_layers), :])
        np.testing.assert_array_equal(reader.routing(sid), s.routed)
        assert s.policy_version == 3 and s.group_id in ("g0", "g1")


def test_bad_lines_are_verdicts_and_the_run_goes_on(tmp_path, tiny, rng):
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    good = _line("ok", req, body)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"{broken json\n\n" + good + b"\n" + good + b"\n[1, 2]\n"
                     + orjson.dumps({"sample_id": "noresp", "request": req}) + b"\n")
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    v = {s["sample_id"]: s for s in result.samples}
    assert v["line-1"]["kinds"] == ["malformed"] and "line 1 is not JSON" in v["line-1"]["message"]
    assert v["line-5"]["kinds"] == ["malformed"]
    assert v["noresp"]["kinds"] == ["malformed"] and "no response" in v["noresp"]["message"]
    assert result.stored == 1
    assert [s["kinds"] for s in result.samples if s["sample_id"] == "ok"] == [
        [], ["duplicate_sample_id"]]
    assert len(ShardReader(tmp_path / "out")) == 1


def test_cli_usage_errors_exit_2(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ["ingest", str(tmp_path / "missing.jsonl"), "--model", "tiny-qwen3-moe", "--engine",
         "sglang", "--out", str(tmp_path / "o1")],
        ["ingest", str(EXAMPLE), "--model", "no-such-model", "--engine", "sglang", "--out",
         str(tmp_path / "o2")],
        ["ingest", str(EXAMPLE), "--model", "tiny-qwen3-moe", "--engine", "tgi", "--out",
         str(tmp_path / "o3")],
        ["ingest", str(EXAMPLE), "--model", "tiny-qwen3-moe", "--engine", "sglang", "--out",
         str(tmp_path / "full")],
    ]
    for args in cases:
        res = runner.invoke(command_line(), args + ["--json"])
        assert res.exit_code == 2, (args, res.output)
        assert "error" in orjson.loads(res.stdout)


def test_append_keeps_earlier_samples(tmp_path, tiny, rng):
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(_line("a", req, body) + b"\n")
    second.write_bytes(_line("b", req, body) + b"\n" + _line("a", req, body) + b"\n")
    ingest(first, tiny, "sglang", tmp_path / "out")
    res = ingest(second, tiny, "sglang", tmp_path / "out", writer_options={"resume": True})
    assert [s["stored"] for s in res.samples] == [True, False]
    assert sorted(ShardReader(tmp_path / "out").sample_ids()) == ["a", "b"]


def test_a_duplicate_id_is_a_duplicate_and_writes_nothing(tmp_path, tiny, rng):
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    path = tmp_path / "t.jsonl"
    path.write_bytes(_line("a", req, body) + b"\n" + _line("a", req, body) + b"\n")
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    first, second = result.samples
    assert first == {"sample_id": "a", "stored": True, "kinds": [], "outcome": "stored"}
    assert second["outcome"] == "duplicate" and second["kinds"] == ["duplicate_sample_id"]
    assert not second["stored"] and "'a'" in second["message"]
    assert result.totals()["rejected"] == 1
    assert result.totals()["by_kind"] == {"duplicate_sample_id": 1}
    reader = ShardReader(tmp_path / "out")
    assert reader.sample_ids() == ["a"] and list(reader.quarantined()) == []
    assert reader.manifest.outcomes == {"stored": 1, "rejected": 0, "failed": 0}


@pytest.mark.parametrize("refusal", ["shape", "dtype"])
def test_a_sample_the_writer_refuses_is_quarantined_as_unstorable(tmp_path, tiny, rng,
                                                                  monkeypatch, refusal):
    """A sample the checks pass but the writer cannot store (here: the check is widened to let
    through routing that does not fit) is rejected as ``unstorable`` with the writer's message
    and kept in the quarantine, and the run goes on."""
    import replay_bridge.sink as sink_module
    from replay_bridge.sample import with_routing

    real_accept = sink_module.accept

    def lenient_accept(ws, geometry):
        report, routed = real_accept(ws, geometry)
        if routed is not None and ws.sample_id == "bad":
            r = routed.routed
            r = (np.concatenate([r, r[:, :1]], axis=1) if refusal == "shape"
                 else r.astype(np.int64) + geometry.num_experts)
            routed = with_routing(routed, r)
        return report, routed

    monkeypatch.setattr(sink_module, "accept", lenient_accept)
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(_line(sid, req, body) + b"\n" for sid in ("a", "bad", "b")))
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    v = {s["sample_id"]: s for s in result.samples}
    assert v["a"]["stored"] and v["b"]["stored"]
    assert v["bad"]["outcome"] == "rejected" and v["bad"]["kinds"] == ["unstorable"]
    words = "routing shape" if refusal == "shape" else "expert ids outside [0, 8)"
    assert words in v["bad"]["message"] and "'bad'" in v["bad"]["message"]
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == ["a", "b"]
    (record,) = reader.quarantined()
    assert record["sample_id"] == "bad" and record["kinds"] == ["unstorable"]
    assert record["message"] == v["bad"]["message"]
    assert reader.manifest.outcomes == {"stored": 2, "rejected": 1, "failed": 0}
