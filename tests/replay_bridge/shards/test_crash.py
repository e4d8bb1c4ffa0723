"""A writer killed with SIGKILL leaves a directory that validates cleanly, holds only complete
shards, and resumes with nothing lost and nothing stored twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc  # noqa: F401
import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardReader, ShardWriter

from .conftest import make_sample
from .helpers import run_cli
from tests.support.processes import child_env


CHILD = r"""
import sys, time
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardWriter
from tests.replay_bridge.shards.conftest import make_sample
g = RoutingGeometry.from_preset("tiny-qwen3-moe")
stop_after = int(sys.argv[2])
w = ShardWriter(sys.argv[1], g, samples_per_shard=3, batch_bytes=1, resume=True)
print("started", flush=True)
i = 0
while True:
    sid = f"s{i:05d}"
    if sid not in w.stored_ids:
        w.add(make_sample(g, sid, 40 + i % 17, seed=i))
        if i % 4 == 0:
            w.quarantine(CheckReport(f"q{i:05d}", kinds=("all_zero",), message="zeros"))
    i += 1
    if i == stop_after:
        print("ready", flush=True)
        time.sleep(60)
"""


def _spawn(d: Path, stop_after: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(d), str(stop_after)], env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_after_kill(d: Path) -> set[str]:
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0, doc
    r = ShardReader(d)  # every listed shard verifies: size, sha256, footer, counts
    for p in d.glob("shard-*.arrow"):  # listed or not, every named shard is complete
        with pa.ipc.open_file(pa.memory_map(str(p))) as f:
            assert sum(f.get_batch(i).num_rows for i in range(f.num_record_batches)) > 0
    ids = r.sample_ids()
    assert len(ids) == len(set(ids))
    return set(ids)


def test_sigkill_mid_shard_then_resume(tmp_path, tiny):
    d = tmp_path / "d"
    child = _spawn(d, stop_after=8)  # shards sealed at 3 and 6; 7 and 8 in the open one
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        assert (d / "shard-000002.arrow.tmp").stat().st_size > 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    stored = _check_after_kill(d)
    assert stored == {f"s{i:05d}" for i in range(6)}
    code, doc, _ = run_cli("validate", d, "--json")
    assert any("shard-000002.arrow.tmp" in w for w in doc["warnings"])
    # resume: the open shard's samples are collected again, nothing twice
    with ShardWriter(d, tiny, samples_per_shard=3, resume=True) as w:
        assert w.stored_ids == stored
        assert not (d / "shard-000002.arrow.tmp").exists()
        for i in range(12):
            if f"s{i:05d}" not in w.stored_ids:
                w.add(make_sample(tiny, f"s{i:05d}", 40 + i % 17, seed=i))
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == [f"s{i:05d}" for i in range(12)]
    for i in (0, 7, 11):
        s = make_sample(tiny, f"s{i:05d}", 40 + i % 17, seed=i)
        assert (r.routing(s.sample_id) == s.routed).all()
    assert [e.file for e in r.manifest.shards] == [f"shard-{i:06d}.arrow" for i in range(4)]


@pytest.mark.slow
def test_sigkill_at_random_instants(tmp_path, tiny):
    """Kill a free-running writer at random instants, resuming each time; every state left
    behind validates, and a final resume completes the set with each id once."""
    d = tmp_path / "d"
    rng = __import__("random").Random(7)
    for _ in range(6):
        child = _spawn(d, stop_after=10**9)
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        time.sleep(0.1 + rng.random() * 0.7)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        stored = _check_after_kill(d)
        # sealed shards hold a prefix of the ids the child adds in order
        assert stored == {f"s{i:05d}" for i in range(len(stored))}
    with ShardWriter(d, tiny, samples_per_shard=3, resume=True) as w:
        for i in range(len(w.stored_ids) + 5):
            if f"s{i:05d}" not in w.stored_ids:
                w.add(make_sample(tiny, f"s{i:05d}", 40 + i % 17, seed=i))
    r = ShardReader(d)
    ids = r.sample_ids()
    assert len(ids) == len(set(ids)) and set(ids) == {f"s{i:05d}" for i in range(len(ids))}
    assert len(ids) >= 5


STREAM_CHILD = r"""
import sys, time
import numpy as np
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.checks import CheckReport
from replay_bridge.sample import WireSample
from replay_bridge.shards import ShardWriter
from tests.replay_bridge.shards.conftest import make_sample
g = RoutingGeometry.from_preset("tiny-qwen3-moe")
stop_after = int(sys.argv[2])
w = ShardWriter(sys.argv[1], g, samples_per_shard=int(sys.argv[3]), quarantine_records=5,
                resume=True)
print("started", flush=True)
i = 0
while True:
    sid = f"q{i:05d}"
    routing = np.zeros((300, g.num_layers, g.top_k), np.int32)
    routing[:, 0, 0] = i % g.num_experts  # each record's routing says whose it is
    w.quarantine(CheckReport(sid, kinds=("all_zero",), message="zeros"),
                 WireSample(sample_id=sid, tokens=np.arange(301, dtype=np.int32), prompt_len=1,
                            routing=routing))
    if i % 3 == 0 and f"s{i:05d}" not in w:
        w.add(make_sample(g, f"s{i:05d}", 20, seed=i))
    i += 1
    if i == stop_after:
        print("ready", flush=True)
        time.sleep(60)
"""


def _spawn_stream(d: Path, stop_after: int, per_shard: int = 4) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STREAM_CHILD, str(d), str(stop_after), str(per_shard)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listed_records(d: Path) -> list[str]:
    """Validate (every listed chunk whole: size, sha256, JSON lines, record count), then the ids
    of every listed record, each checked against the routing it must carry."""
    from replay_bridge.shards import decode_routing

    _check_after_kill(d)
    ids = []
    for rec in ShardReader(d).quarantined():
        i = int(rec["sample_id"][1:])
        routing = decode_routing(rec)
        assert routing.shape == (300, 4, 2) and (routing[:, 0, 0] == i % 8).all()
        ids.append(rec["sample_id"])
    return ids


def test_sigkill_while_quarantine_records_stream(tmp_path, tiny):
    """Killed with 13 records written: the two sealed chunks (10 records) are listed and whole,
    the open chunk's 3 are lost; a resumed run writes the lost ones and none of the listed
    ones again (chunks of 5 records; shards of 100 samples never seal one early)."""
    d = tmp_path / "d"
    for stop_after, listed in ((13, 10), (27, 25)):
        child = _spawn_stream(d, stop_after, per_shard=100)
        try:
            assert child.stdout.readline().strip() == "started", child.stderr.read()
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            assert (d / f"quarantine-{listed // 5:06d}.jsonl.tmp").stat().st_size > 0
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        ids = _listed_records(d)
        assert ids == [f"q{i:05d}" for i in range(listed)]  # each once, in order, none torn
        m = ShardReader(d).manifest
        assert m.outcomes["rejected"] == listed == m.quarantined


@pytest.mark.slow
def test_sigkill_at_random_instants_while_quarantine_records_stream(tmp_path, tiny):
    d = tmp_path / "d"
    rng = __import__("random").Random(11)
    for _ in range(5):
        child = _spawn_stream(d, stop_after=10**9)
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        time.sleep(0.1 + rng.random() * 0.6)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        ids = _listed_records(d)
        assert ids == [f"q{i:05d}" for i in range(len(ids))]
    n = len(ids)
    with ShardWriter(d, tiny, resume=True) as w:
        for i in range(n + 3):  # the listed ones are not written again, the rest are
            w.quarantine(CheckReport(f"q{i:05d}", kinds=("all_zero",), message="zeros"))
    final = [r["sample_id"] for r in ShardReader(d).quarantined()]
    # Each once, in order. A kill between a chunk's rename and the manifest's rewrite leaves a
    # complete chunk (5 records) that the resumed writer adopts: up to 2 records past n + 3.
    assert final == [f"q{i:05d}" for i in range(len(final))]
    assert n + 3 <= len(final) <= n + 5
