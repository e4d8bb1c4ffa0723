"""A writer killed with SIGKILL leaves a dataset that validates cleanly, holds only complete
shards under shard names, and resumes (as a new writer) with nothing lost and nothing stored
twice; what the killed writer left unpublished is ignored by readers, reported by validate and
removed by cleanup. On a local directory and on an S3-compatible server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.ipc  # noqa: F401
import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardReader, ShardWriter, cleanup_dataset

from .conftest import make_sample
from .helpers import (is_local, listed_shards, local_path, object_names, quarantine_name,
                      read_object, run_cli, shard_name, shard_objects, temp_name)
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
print("started", w.writer_id, flush=True)
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


def _spawn(d: str, stop_after: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(d), str(stop_after)], env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _started(child: subprocess.Popen) -> str:
    """The child's writer id, once it has published its (empty) manifest."""
    line = child.stdout.readline().split()
    assert line[:1] == ["started"], child.stderr.read()
    return line[1]


def _check_after_kill(d: str) -> set[str]:
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0, doc
    r = ShardReader(d, verify=True)  # every listed shard verifies: size, digest, schema, counts
    for name in shard_objects(d):  # listed or not, every object under a shard name is complete
        with pa.ipc.open_file(pa.py_buffer(read_object(d, name))) as f:
            assert sum(f.get_batch(i).num_rows for i in range(f.num_record_batches)) > 0
    ids = r.sample_ids()
    assert len(ids) == len(set(ids)) and r.duplicates == []
    return set(ids)


def test_sigkill_mid_shard_then_resume(dataset_uri, tiny):
    d = dataset_uri
    child = _spawn(d, stop_after=8)  # shards sealed at 3 and 6; 7 and 8 in the open one
    try:
        writer = _started(child)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        open_shard = shard_name(writer, 2)
        assert open_shard not in object_names(d)  # nothing half-written under a shard name
        if is_local(d):
            assert local_path(d, temp_name(open_shard)).stat().st_size > 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    stored = _check_after_kill(d)
    assert stored == {f"s{i:05d}" for i in range(6)}
    code, doc, _ = run_cli("validate", d, "--json")
    if is_local(d):
        assert any(temp_name(open_shard) in w for w in doc["warnings"])
    # resume: a new writer; the open shard's samples are collected again, nothing twice
    with ShardWriter(d, tiny, samples_per_shard=3, resume=True) as w:
        assert w.stored_ids == stored
        for i in range(12):
            if f"s{i:05d}" not in w.stored_ids:
                w.add(make_sample(tiny, f"s{i:05d}", 40 + i % 17, seed=i))
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == [f"s{i:05d}" for i in range(12)]
    for i in (0, 7, 11):
        s = make_sample(tiny, f"s{i:05d}", 40 + i % 17, seed=i)
        assert (r.routing(s.sample_id) == s.routed).all()
    assert listed_shards(d) == [shard_name(writer, 0), shard_name(writer, 1),
                                shard_name(w.writer_id, 0), shard_name(w.writer_id, 1)]
    removed = cleanup_dataset(d, older_than=0).removed
    assert removed == ([temp_name(open_shard)] if is_local(d) else [])
    code, doc, _ = run_cli("validate", d, "--json")
    assert code == 0 and doc["warnings"] == []


@pytest.mark.slow
def test_sigkill_at_random_instants(dataset_uri, tiny):
    """Kill a free-running writer at random instants, resuming each time; every state left
    behind validates, and a final resume completes the set with each id once."""
    d = dataset_uri
    rng = __import__("random").Random(7)
    for _ in range(6 if is_local(d) else 3):  # each kill on S3 costs a child's start-up more
        child = _spawn(d, stop_after=10**9)
        _started(child)
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
    cleanup_dataset(d, older_than=0)  # what the killed writers left unpublished
    assert _check_after_kill(d) == set(ids)
    assert run_cli("validate", d, "--json")[1]["warnings"] == []


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
print("started", w.writer_id, flush=True)
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


def _spawn_stream(d: str, stop_after: int, per_shard: int = 4) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STREAM_CHILD, str(d), str(stop_after), str(per_shard)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listed_records(d: str) -> list[str]:
    """Validate (every listed chunk whole: size, digest, JSON lines, record count), then the ids
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


def test_sigkill_while_quarantine_records_stream(dataset_uri, tiny):
    """Killed with 13 records written: the two sealed chunks (10 records) are listed and whole,
    the open chunk's 3 are lost; a resumed run (a new writer) writes the lost ones and none of
    the listed ones again (chunks of 5 records; shards of 100 samples never seal one early)."""
    d = dataset_uri
    before = 0
    for stop_after, listed in ((13, 10), (27, 25)):
        child = _spawn_stream(d, stop_after, per_shard=100)
        try:
            writer = _started(child)
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            open_chunk = quarantine_name(writer, (listed - before) // 5)
            assert open_chunk not in object_names(d)
            if is_local(d):
                assert local_path(d, temp_name(open_chunk)).stat().st_size > 0
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        ids = _listed_records(d)
        assert ids == [f"q{i:05d}" for i in range(listed)]  # each once, in order, none torn
        m = ShardReader(d).manifest
        assert m.outcomes["rejected"] == listed == m.quarantined
        before = listed


@pytest.mark.slow
def test_sigkill_at_random_instants_while_quarantine_records_stream(dataset_uri, tiny):
    d = dataset_uri
    rng = __import__("random").Random(11)
    for _ in range(5 if is_local(d) else 3):
        child = _spawn_stream(d, stop_after=10**9)
        _started(child)
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
    # Each once, in order. A chunk a kill left sealed but unlisted is never adopted: the
    # resumed writer writes exactly the records not listed; cleanup removes the leftover.
    assert final == [f"q{i:05d}" for i in range(n + 3)]
    cleanup_dataset(d, older_than=0)
    assert run_cli("validate", d, "--json")[1]["warnings"] == []
    assert [r["sample_id"] for r in ShardReader(d).quarantined()] == final
