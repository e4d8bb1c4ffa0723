"""Many writers, one dataset, no lock: concurrent ``ingest --append`` processes into one URI
(a local directory and the loopback S3 server), and a writer killed at any moment (20 trials
per backend): nothing published is lost, nothing is stored twice, every checksum holds, and the
killed writer's rerun completes the dataset."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardError, ShardReader, cleanup_dataset, validate_dataset
from tests.replay_bridge.protocols.engines import routing, sglang_generate
from tests.support.processes import child_env, cli

TINY = RoutingGeometry.from_preset("tiny-qwen3-moe")
Expected = dict[str, tuple[list[int], np.ndarray]]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def write_traffic(path: Path, ids: list[str], seed: int) -> Expected:
    """SGLang traffic for ``ids`` at ``path``; each id's tokens and stored routing."""
    rng = np.random.default_rng(seed)
    expected, lines = {}, []
    for sid in ids:
        prompt = rng.integers(0, 900, int(rng.integers(2, 12))).tolist()
        out = rng.integers(0, 900, int(rng.integers(1, 10))).tolist()
        r = routing(rng, len(prompt) + len(out) - 1, TINY)
        req, body = sglang_generate(prompt, out, r)
        lines.append(orjson.dumps({"sample_id": sid, "request": req,
                                   "response": orjson.loads(body), "group_id": sid[:-2]}))
        expected[sid] = (prompt + out, r[:, list(TINY.moe_layers), :])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def ingest_argv(path: Path, uri: str, per_shard: int) -> list[str]:
    return ["ingest", str(path), "--model", "tiny-qwen3-moe", "--engine", "sglang",
            "--out", uri, "--append", "--samples-per-shard", str(per_shard)]


def manifests(uri: str, request: pytest.FixtureRequest) -> list[str]:
    if uri.startswith("s3://"):
        keys = request.getfixturevalue("s3").keys(uri)
    else:
        keys = [str(p.relative_to(uri)) for p in Path(uri).rglob("*")]
    return sorted(k for k in keys if k.startswith("_routing_replay/manifests/"))


def external_dataset(uri: str) -> pads.Dataset:
    """What ``pyarrow.dataset`` sees at the dataset's top level."""
    if not uri.startswith("s3://"):
        return pads.dataset(uri, format="arrow")
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1",
                           access_key=os.environ["AWS_ACCESS_KEY_ID"],
                           secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    return pads.dataset(uri.removeprefix("s3://"), filesystem=fs, format="arrow")


def check_complete(uri: str, expected: Expected) -> None:
    """Every expected id once, with its tokens and routing; every object's checksum holds
    (validate); once what no manifest lists is cleaned up, pyarrow sees each id once."""
    reader = ShardReader(uri)
    ids = reader.index.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == set(expected)
    for s in reader.read(sorted(expected)):
        tokens, r = expected[s.sample_id]
        assert s.tokens.tolist() == tokens
        np.testing.assert_array_equal(s.routed, r)
    report = validate_dataset(uri)
    assert report.ok and report.faults == [], report.to_dict()
    assert report.samples == len(expected)
    assert not [w for w in report.warnings if "two writers" in w], report.warnings
    removed = cleanup_dataset(uri, older_than=0.0).removed
    assert not [n for n in removed if n.endswith(".json")], removed  # manifests stay
    external = external_dataset(uri).to_table(columns=["sample_id"]).column(0).to_pylist()
    assert sorted(external) == sorted(expected)


# ---- N writers at once ----------------------------------------------------------------------


def test_writers_append_to_one_dataset_at_once(dataset_uri, request, tmp_path):
    """4 ``ingest --append`` processes start together on a dataset nobody created."""
    expected: Expected = {}
    files = []
    for w in range(4):
        path = tmp_path / f"w{w}.jsonl"
        expected.update(write_traffic(path, [f"w{w}-{i:03d}" for i in range(60)], seed=w))
        files.append(path)
    procs = [subprocess.Popen(cli(*ingest_argv(f, dataset_uri, 5), "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
             for f in files]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        doc = orjson.loads(out)
        assert doc["totals"]["stored"] == 60 and doc["totals"]["rejected"] == 0
    assert len(manifests(dataset_uri, request)) == 4  # one per writer
    check_complete(dataset_uri, expected)


def test_the_same_ids_from_two_writers_are_read_once(dataset_uri, tmp_path):
    """Two writers racing on the same 40 ids (different routing each): an id both stored is
    read once (one writer's copy, whole) and named by validate; never doubled."""
    a = write_traffic(tmp_path / "a.jsonl", [f"s-{i:03d}" for i in range(40)], seed=1)
    b = write_traffic(tmp_path / "b.jsonl", [f"s-{i:03d}" for i in range(40)], seed=2)
    procs = [subprocess.Popen(cli(*ingest_argv(tmp_path / f"{n}.jsonl", dataset_uri, 4),
                                  "--json"), stdout=subprocess.PIPE, env=child_env())
             for n in "ab"]
    stored = 0
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        stored += orjson.loads(out)["totals"]["stored"]
    reader = ShardReader(dataset_uri)
    assert sorted(reader.sample_ids()) == sorted(a) and len(reader) == 40
    assert reader.index.num_rows == 40
    for sid in a:
        got = reader.routing(sid)
        assert any(np.array_equal(got, v[sid][1]) and reader[sid].tokens.tolist() == v[sid][0]
                   for v in (a, b)), sid
    report = validate_dataset(dataset_uri)
    assert report.ok, report.to_dict()
    twice = [w for w in report.warnings if "two writers" in w]
    assert len(twice) == stored - 40  # every id stored by both is named, once


# ---- kill any writer ------------------------------------------------------------------------

DRIVER = """
import sys
import orjson
from replay_bridge.cli import main
print("ready", flush=True)
for line in sys.stdin:
    sys.argv = ["replay-bridge", *orjson.loads(line)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    print(f"exit {code}", flush=True)
"""


class Driver:
    """A process with the CLI imported, running one ``replay-bridge`` command per request
    (each ``ingest --append`` is a new writer), so a trial's timing is the command's own."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=child_env())
        self.ready = False

    def errors(self) -> str:
        """The end of what its commands printed on stderr (for a failure's message)."""
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        if not self.ready:
            assert self.proc.stdout.readline() == b"ready\n", "driver did not start"
            self.ready = True

    def start(self, argv: list[str]) -> None:
        self.wait_ready()
        self.proc.stdin.write(orjson.dumps(argv) + b"\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[int, bytes]:
        """The command's exit code and what it printed on stdout (JSON with ``--json``)."""
        out = b""
        while not (line := self.proc.stdout.readline()).startswith(b"exit "):
            assert line, f"the driver died: {out[-2000:]!r}"
            out += line
        return int(line.split()[1]), out

    def kill(self) -> bool:
        """SIGKILL; whether it was still running."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)
        return alive

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def drivers(tmp_path: Path) -> Iterator[list[Driver]]:
    logs = tmp_path / "driver-logs"
    logs.mkdir()
    pool = [Driver(logs / f"{i}.log") for i in range(4)]
    yield pool
    for d in pool:
        d.close()


def stored_ids(uri: str) -> set[str]:
    """The ids a reader opening now sees (nothing when no manifest is published yet)."""
    try:
        return set(ShardReader(uri, verify=False).sample_ids())
    except ShardError as e:
        if "not a routing-replay dataset" in str(e):
            return set()
        raise


TRIALS = 20
WRITERS = 3
SAMPLES = 60
PER_SHARD = 5


@pytest.mark.timeout(900)
def test_kill_any_writer_at_any_moment(dataset_uri, request, tmp_path, drivers):
    """20 trials: 3 writers append at once, one (chosen at random) is SIGKILLed at a random
    moment of its run. Whatever a reader saw published stays; the others finish; the killed
    writer's rerun (``--append``) stores exactly what it had not published; then every id is
    there once, checksums hold, and cleanup leaves pyarrow only the published shards."""
    backend = request.node.callspec.params["dataset_uri"]
    rng = random.Random(f"kill-{backend}")
    files, expected = [], {}
    for w in range(WRITERS):
        path = tmp_path / f"w{w}.jsonl"
        expected.update(write_traffic(path, [f"w{w}-{i:03d}" for i in range(SAMPLES)], seed=w))
        files.append(path)
    per_writer = {w: {sid for sid in expected if sid.startswith(f"w{w}-")}
                  for w in range(WRITERS)}
    durations: list[float] = []
    live_kills = partial_kills = 0
    for trial in range(TRIALS):
        uri = dataset_uri if trial == 0 else _fresh(dataset_uri, request, trial)
        victim = rng.randrange(WRITERS)
        estimate = statistics.median(durations) if durations else 1.0
        delay = rng.uniform(0.0, 1.1) * estimate
        team = drivers[:WRITERS]
        for d in team:
            d.wait_ready()
        t0 = time.monotonic()
        for w, d in enumerate(team):
            d.start(ingest_argv(files[w], uri, PER_SHARD))
        seen: set[str] = set()
        while time.monotonic() - t0 < delay:  # readers open the dataset while it grows
            now = stored_ids(uri)
            assert seen <= now, f"trial {trial}: published ids vanished: {sorted(seen - now)}"
            seen = now
            time.sleep(0.02)
        killed = team[victim]
        alive = killed.kill()
        live_kills += alive
        for w, d in enumerate(team):
            if d is not killed:
                assert d.result()[0] == 0, f"trial {trial}: writer {w} failed:\n{d.errors()}"
                durations.append(time.monotonic() - t0)
        if not alive:
            assert killed.proc.returncode == 0
        after = stored_ids(uri)
        assert seen <= after, f"trial {trial}: published ids lost: {sorted(seen - after)}"
        for w in range(WRITERS):
            if w != victim:
                assert per_writer[w] <= after, f"trial {trial}: writer {w} incomplete"
        published = after & per_writer[victim]
        partial_kills += 0 < len(published) < SAMPLES
        assert len(after) == len(expected) - SAMPLES + len(published)

        # the killed writer's place is taken by a fresh process; its rerun finishes the job
        drivers[drivers.index(killed)] = Driver(tmp_path / "driver-logs" / f"t{trial}.log")
        rerun = drivers[WRITERS]
        rerun.start(ingest_argv(files[victim], uri, PER_SHARD) + ["--json"])
        code, out = rerun.result()
        assert code == 0, f"trial {trial}: rerun failed: {out[-2000:]!r}\n{rerun.errors()}"
        totals = orjson.loads(out)["totals"]  # what was published is not stored again
        assert totals["stored"] == SAMPLES - len(published), (trial, totals)
        assert totals["rejected"] == len(published)
        check_complete(uri, expected)
    # the kills fell during runs, also between a writer's first and last publish
    assert live_kills >= TRIALS // 2, (live_kills, durations)
    assert partial_kills >= 3, (partial_kills, durations)


def _fresh(first: str, request: pytest.FixtureRequest, trial: int) -> str:
    if first.startswith("s3://"):
        return request.getfixturevalue("s3").fresh_uri(label=f"kill-trial-{trial}")
    return f"{first}-{trial}"
