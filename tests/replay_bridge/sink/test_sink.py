"""SampleSink: one verdict per sample, in one documented vocabulary, with or without the
background writer thread."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from replay_bridge.checks import KINDS, accept
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import decode_response
from replay_bridge.sample import WireSample
from replay_bridge.shards import Manifest, ShardReader, ShardWriter
from replay_bridge.sink import OUTCOMES, VERDICT_KINDS, SampleSink, Verdict
from tests.replay_bridge.protocols.engines import routing, sglang_generate
from tests.support.processes import ROOT

SINK_KINDS = {"unstorable": "rejected", "duplicate_sample_id": "duplicate",
              "already_stored": "duplicate", "request_failed": "failed"}


def wire(geometry: RoutingGeometry, sid: str, seed: int, *, zero: bool = False,
         drop: bool = False) -> WireSample:
    """A decoded /generate answer: good, with all-zero prompt rows, or without routing."""
    rng = np.random.default_rng(seed)
    prompt, out = [1, 2, 3 + seed], [4, 5, 6]
    r = routing(rng, len(prompt) + len(out) - 1, geometry)
    if zero:
        r[:2] = 0
    req, body = sglang_generate(prompt, out, None if drop else r)
    (ws,) = decode_response("sglang", req, body, geometry, sid)
    return ws


def feed(sink: SampleSink, geometry: RoutingGeometry) -> list[Verdict]:
    """One sample down every path the sink has."""
    other = RoutingGeometry(geometry.num_layers, geometry.moe_layers, geometry.top_k + 1,
                            geometry.num_experts)
    wider_wire = wire(other, "wider", 9)
    report, wider = accept(wider_wire, other)  # accepted by another geometry's checks
    assert wider is not None
    return [
        sink.add(wire(geometry, "good", 0)),
        sink.add(wire(geometry, "zeros", 1, zero=True)),
        sink.add(wire(geometry, "none", 2, drop=True)),
        sink.add_checked(report, wider, wider_wire),
        sink.add(wire(geometry, "good", 3)),
        sink.add_failure("lost", "HTTP 503: gave up after 3 attempts"),
    ]


def test_the_vocabulary_extends_the_check_kinds_and_says_what_each_word_means() -> None:
    assert tuple(VERDICT_KINDS)[:len(KINDS)] == KINDS
    assert set(VERDICT_KINDS) - set(KINDS) == set(SINK_KINDS)
    assert set(SINK_KINDS.values()) <= set(OUTCOMES)
    assert {"stored", "rejected", "duplicate", "failed", "accepted"} == set(OUTCOMES)
    for word, meaning in (*OUTCOMES.items(), *VERDICT_KINDS.items()):
        assert meaning.strip() and "\n" not in meaning, word


def test_the_docs_list_every_outcome_and_kind() -> None:
    text = (ROOT / "docs" / "shards.md").read_text()
    section = text.split("## Outcomes and verdict kinds", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*)$", section, re.M))
    assert set(rows) == set(OUTCOMES) | set(VERDICT_KINDS)
    for kind, outcome in SINK_KINDS.items():
        assert rows[kind].startswith(outcome)


@pytest.mark.parametrize("background", [False, True])
def test_every_path_gives_a_verdict_in_the_vocabulary(tiny: RoutingGeometry, tmp_path: Path,
                                                      background: bool) -> None:
    out = tmp_path / "out"
    with ShardWriter(out, tiny) as writer, SampleSink(writer, background=background) as sink:
        verdicts = feed(sink, tiny)
    assert [(v.sample_id, v.outcome, v.kinds) for v in verdicts] == [
        ("good", "stored", ()),
        ("zeros", "rejected", ("all_zero",)),
        ("none", "rejected", ("missing_routing",)),
        ("wider", "rejected", ("unstorable",)),
        ("good", "duplicate", ("duplicate_sample_id",)),
        ("lost", "failed", ("request_failed",)),
    ]
    emitted = {v.outcome for v in verdicts}
    assert emitted == set(OUTCOMES) - {"accepted"}
    assert all(set(v.kinds) <= set(VERDICT_KINDS) for v in verdicts)
    wider = next(v for v in verdicts if v.sample_id == "wider")
    assert "routing shape" in wider.message and "does not fit" in wider.message
    dup = next(v for v in verdicts if v.outcome == "duplicate")
    assert "'good'" in dup.message and "duplicate_sample_id" in dup.message

    reader = ShardReader(out)
    assert reader.sample_ids() == ["good"]
    records = {r["sample_id"]: r for r in reader.quarantined()}
    assert set(records) == {"zeros", "none", "wider", "lost"}  # a duplicate writes nothing
    for r in records.values():
        assert r["outcome"] in OUTCOMES and set(r["kinds"]) <= set(VERDICT_KINDS)
    assert records["wider"]["kinds"] == ["unstorable"]
    assert records["wider"]["message"] == wider.message
    assert records["lost"]["kinds"] == ["request_failed"]
    manifest = Manifest.read(out)
    assert manifest.outcomes == {k: sink.counts[k] for k in ("stored", "rejected", "failed")}
    assert sink.counts == {"stored": 1, "rejected": 3, "duplicate": 1, "failed": 1}
    assert sink.tally.by_kind == {"all_zero": 1, "missing_routing": 1, "unstorable": 1,
                                  "duplicate_sample_id": 1}
    assert sink.tokens_stored == 6


def test_background_and_foreground_give_the_same_verdicts_and_files(tiny: RoutingGeometry,
                                                                    tmp_path: Path) -> None:
    def run(name: str, background: bool) -> tuple[list[dict[str, Any]], list[Any]]:
        with ShardWriter(tmp_path / name, tiny) as w, SampleSink(w, background=background) as s:
            verdicts = [v.to_dict() for v in feed(s, tiny)]
        r = ShardReader(tmp_path / name)
        quarantined = [{k: v for k, v in q.items() if k != "time"} for q in r.quarantined()]
        return verdicts, [r.sample_ids(), quarantined]

    assert run("fg", False) == run("bg", True)


class FailingWriter(ShardWriter):
    def append(self, sample: Any) -> None:
        raise OSError("disk full")


def test_an_error_on_the_writer_thread_reaches_the_caller(tiny: RoutingGeometry,
                                                          tmp_path: Path) -> None:
    writer = FailingWriter(tmp_path / "out", tiny)
    with pytest.raises(OSError, match="disk full"):
        with SampleSink(writer, background=True) as sink:
            for i in range(50):
                sink.add(wire(tiny, f"s{i}", i))
    writer.close()
