"""Hostile dump lines: every bad value is a verdict for its own line, the run reads on, the
envelope's types are checked at the door, and no id is ever made up."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from replay_bridge.shards import ShardReader
from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion

runner = CliRunner()


def _good(sid: str, rng: np.random.Generator, g: RoutingGeometry, **extra: Any
          ) -> tuple[dict[str, Any], np.ndarray]:
    r = routing(rng, 4, g)
    req, body = sglang_generate([1, 2, 3], [4, 5], r)
    return {"sample_id": sid, "request": req, "response": orjson.loads(body), **extra}, r


def _write(path, lines: list[Any]) -> None:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n"
                              for x in lines))


def _verdicts(result) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for v in result.samples:
        out.setdefault(v["sample_id"], []).append(v)
    return out


def test_a_whitespace_only_line_is_skipped(tmp_path, tiny, rng):
    a, _ = _good("a", rng, tiny)
    b, _ = _good("b", rng, tiny)
    path = tmp_path / "t.jsonl"
    _write(path, [a, b" \t " * 40, b"   ", b, b"\t" * 100 + b"\r"])
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    assert [v["sample_id"] for v in result.samples] == ["a", "b"]
    assert result.lines == 2 and result.rejected == 0


def test_a_line_without_an_id_never_takes_a_real_one(tmp_path, tiny, rng):
    """Line 1 names no sample; line 2 is the real sample ``line-1``: it is stored with its own
    routing, and line 1 is one malformed verdict that is never stored."""
    anon, _ = _good("x", rng, tiny)
    del anon["sample_id"]
    real, r = _good("line-1", rng, tiny)
    path = tmp_path / "t.jsonl"
    _write(path, [anon, real])
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    first, second = result.samples
    assert first["outcome"] == "rejected" and first["kinds"] == ["malformed"]
    assert "line 1: sample_id is missing" in first["message"]
    assert second == {"sample_id": "line-1", "stored": True, "kinds": [], "outcome": "stored"}
    reader = ShardReader(tmp_path / "out")
    assert reader.sample_ids() == ["line-1"]
    np.testing.assert_array_equal(reader["line-1"].routed, r)


@pytest.mark.parametrize("bad", [12, 1.5, True, ["a"], {"a": 1}, ""])
def test_an_id_that_is_not_a_non_empty_string_is_malformed(tmp_path, tiny, rng, bad):
    line, _ = _good("x", rng, tiny)
    line["sample_id"] = bad
    good, _ = _good("ok", rng, tiny)
    path = tmp_path / "t.jsonl"
    _write(path, [line, good])
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    v = _verdicts(result)
    assert v["line-1"][0]["kinds"] == ["malformed"]
    assert "line 1: sample_id" in v["line-1"][0]["message"]
    assert v["ok"][0]["stored"] and result.stored == 1
    assert ShardReader(tmp_path / "out").sample_ids() == ["ok"]


@pytest.mark.parametrize("field, value, needle", [
    ("policy_version", True, "policy_version True is a bool"),
    ("policy_version", 1.0, "policy_version 1.0 is a float"),
    ("policy_version", "3", "policy_version '3' is a str"),
    ("policy_version", 2**64 - 1, "outside int64"),
    ("group_id", 5, "group_id 5 is an int"),
    ("group_id", ["g"], "group_id ['g'] is a list"),
])
def test_a_wrongly_typed_envelope_field_loses_no_good_sample(tmp_path, tiny, rng, field, value,
                                                              needle):
    """One line's bad type is its own verdict; the 40 good samples around it are all stored,
    exactly."""
    lines, expected = [], {}
    for i in range(40):
        line, r = _good(f"g{i}", rng, tiny, group_id="grp", policy_version=7)
        lines.append(line)
        expected[f"g{i}"] = r
        if i == 20:
            bad, _ = _good("bad", rng, tiny)
            bad[field] = value
            lines.append(bad)
    path = tmp_path / "t.jsonl"
    _write(path, lines)
    result = ingest(path, tiny, "sglang", tmp_path / "out")
    v = _verdicts(result)
    assert v["bad"][0]["kinds"] == ["malformed"] and needle in v["bad"][0]["message"]
    assert "line 22" in v["bad"][0]["message"]
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == sorted(expected)
    for sid, r in expected.items():
        s = reader[sid]
        np.testing.assert_array_equal(s.routed, r)
        assert (s.group_id, s.policy_version) == ("grp", 7)
    [record] = reader.quarantined()
    assert record["sample_id"] == "bad" and record["kinds"] == ["malformed"]


SGLANG_LINES = {
    "meta_info a list": lambda x: x["response"].update(meta_info=[1]),
    "logprobs an int": lambda x: x["response"]["meta_info"].update(output_token_logprobs=3),
    "logprobs a dict": lambda x: x["response"]["meta_info"].update(
        output_token_logprobs={"a": 1}),
    "logprobs dicts and ints": lambda x: x["response"]["meta_info"].update(
        output_token_logprobs=[{"logprob": -1.0}, 3]),
    "n not an integer": lambda x: x["request"]["sampling_params"].update(n="2"),
    "empty sample id": lambda x: x.update(sample_id=""),
    "routing ids as floats": lambda x: x["response"]["meta_info"].update(
        routed_experts=(np.arange(32).reshape(4, 4, 2) % 8 + 0.5).tolist()),
    "token ids as bools": lambda x: x["response"].update(output_ids=[True, False]),
}


def test_malformed_values_do_not_stop_the_cli(tmp_path, tiny, rng):
    """Every value that once ended the run with a traceback: the CLI reads every line, prints
    its JSON, stores every good sample and exits 1."""
    lines, good = [], {}
    for i, (case, spoil) in enumerate(SGLANG_LINES.items()):
        line, r = _good(f"good{i}", rng, tiny)
        lines.append(line)
        good[f"good{i}"] = r
        bad, _ = _good(f"bad{i}", rng, tiny)
        spoil(bad)
        lines.append(bad)
    path = tmp_path / "t.jsonl"
    _write(path, lines)
    out = tmp_path / "out"
    res = runner.invoke(command_line(), ["ingest", str(path), "--model", "tiny-qwen3-moe",
                                         "--engine", "sglang", "--out", str(out), "--json"])
    assert res.exit_code == 1, res.output
    doc = orjson.loads(res.stdout)
    verdicts = doc["samples"]
    assert doc["totals"]["stored"] == len(good) and doc["totals"]["lines"] == len(lines)
    bad = [v for v in verdicts if not v["stored"]]
    assert len(bad) == len(SGLANG_LINES)
    assert all(v["kinds"] == ["malformed"] for v in bad), bad
    reader = ShardReader(out)
    assert sorted(reader.sample_ids()) == sorted(good)
    for sid, r in good.items():
        np.testing.assert_array_equal(reader[sid].routed, r)


@pytest.mark.parametrize("n", ["2", 2.0, True, 0, None])
def test_a_bad_vllm_n_is_one_verdict(tmp_path, tiny, rng, n):
    req, body = vllm_completion([1, 2, 3], [[4, 5], [6, 7]],
                                [routing(rng, 4, tiny), routing(rng, 4, tiny)], "int32")
    req["n"] = n
    path = tmp_path / "t.jsonl"
    _write(path, [{"sample_id": "v", "request": req, "response": orjson.loads(body)}])
    result = ingest(path, tiny, "vllm", tmp_path / "out")
    if n is None:  # absent n is 1: two choices for one asked-for sample
        assert [(v["sample_id"], v["stored"]) for v in result.samples] == [
            ("v", True), ("v/choice-1", False)]
        return
    [verdict] = result.samples
    assert verdict["kinds"] == ["malformed"] and "request n=" in verdict["message"]


def test_fewer_vllm_choices_than_n_are_failed(tmp_path, tiny, rng):
    rs = [routing(rng, 4, tiny), routing(rng, 4, tiny), routing(rng, 4, tiny)]
    req, body = vllm_completion([1, 2, 3], [[4, 5], [6, 7], [8, 9]], rs, "int32")
    answer = orjson.loads(body)
    del answer["choices"][1]
    path = tmp_path / "t.jsonl"
    _write(path, [{"sample_id": "v", "request": req, "response": answer}])
    out = tmp_path / "out"
    res = runner.invoke(command_line(), ["ingest", str(path), "--model", "tiny-qwen3-moe",
                                         "--engine", "vllm", "--out", str(out), "--json"])
    assert res.exit_code == 1, res.output
    v = {x["sample_id"]: x for x in orjson.loads(res.stdout)["samples"]}
    assert v["v/0"]["stored"] and v["v/2"]["stored"]
    assert v["v/1"]["outcome"] == "failed" and v["v/1"]["kinds"] == ["request_failed"]
    assert "held 2 samples for 3 asked for" in v["v/1"]["message"]
    reader = ShardReader(out)
    assert sorted(reader.sample_ids()) == ["v/0", "v/2"]
    [record] = reader.quarantined()
    assert record["sample_id"] == "v/1" and record["outcome"] == "failed"
