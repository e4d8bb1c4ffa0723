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

from replay_bridge.shards import ShardReader, ShardWriter

from .conftest import make_sample
from .helpers import run_cli
from tests.support.processes import ROOT


CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
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
    sid = f"s{{i:05d}}"
    if sid not in w.stored_ids:
        w.add(make_sample(g, sid, 40 + i % 17, seed=i))
        if i % 4 == 0:
            w.quarantine(CheckReport(f"q{{i:05d}}", kinds=("all_zero",), message="zeros"))
    i += 1
    if i == stop_after:
        print("ready", flush=True)
        time.sleep(60)
"""


def _spawn(d: Path, stop_after: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(d), str(stop_after)],
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
