"""Distributed collect on a 2-node Ray cluster against several reference engines: the prompts
spread over the workers into one dataset, a worker killed mid-run loses nothing and stores
nothing twice, ``collect --ray --resume`` skips what any worker stored."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from replay_bridge.client import Prompt, SamplingParams
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ray import assign_endpoints, collect_on_ray
from replay_bridge.shards import ShardReader, validate_dataset
from tests.support.processes import ROOT, child_env, cli, stop

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")
pytest.importorskip("transformers", reason="the reference engine needs the 'server' extra")

CLUSTER_WITH_S3 = True  # the cluster's workers reach the loopback S3 server
GEOMETRY = RoutingGeometry.from_preset("tiny-qwen3-moe")
PARAMS = SamplingParams(max_new_tokens=4, temperature=1.0, extra={"ignore_eos": True})
ENGINES = 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reference_engine import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[list[str]]:
    """``ENGINES`` reference engines (``replay-bridge serve``), each its own process."""
    procs: list[subprocess.Popen] = []
    urls = []
    try:
        for _ in range(ENGINES):
            proc = subprocess.Popen(
                cli("serve", "--model", str(tiny_model), "--port", "0", "--dtype", "float32",
                    "--json"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                env=child_env())
            procs.append(proc)
        for proc in procs:
            line = proc.stdout.readline()
            assert line, "replay-bridge serve did not start"
            urls.append(json.loads(line)["url"])
        yield urls
    finally:
        for proc in procs:
            stop(proc)


def prompts(n: int, start: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(11)
    return [Prompt(f"q{i}", rng.integers(3, 500, 3 + i % 4).tolist())
            for i in range(start, start + n)]


def ids_of(items: list[Prompt], g: int) -> set[str]:
    return {f"{p.prompt_id}/{j}" for p in items for j in range(g)}


def assert_each_stored_once(uri: str, expected: set[str]) -> ShardReader:
    """Every expected id is published, and exactly once over all writers' manifests."""
    report = validate_dataset(uri)
    assert report.ok, report
    reader = ShardReader(uri)
    ids = reader.index.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "a sample id stored twice"
    assert set(ids) == expected
    return reader


def test_endpoints_are_shared_round_robin() -> None:
    assert assign_endpoints(["a", "b", "c"], 2) == [["a", "c"], ["b"]]
    assert assign_endpoints(["a", "b"], 3) == [["a"], ["b"], ["a"]]
    with pytest.raises(ValueError):
        assign_endpoints([], 1)


def test_workers_on_two_nodes_collect_into_one_dataset(cluster: Any, engines: list[str],
                                                       tmp_path: Path) -> None:
    items = prompts(18)
    seen: list[tuple[int, int]] = []
    out = str(tmp_path / "ds")
    s = collect_on_ray(endpoints=engines, engine="sglang", prompts=items, geometry=GEOMETRY,
                       out=out, workers=3, samples_per_prompt=2, params=PARAMS, concurrency=4,
                       total_prompts=len(items), num_cpus=0.5, keep_verdicts=True,
                       on_progress=lambda done, total, _: seen.append((done, total)))
    t = s["totals"]
    assert (t["prompts"], t["samples"], t["stored"], t["rejected"], t["failed"]) == (
        18, 36, 36, 0, 0)
    assert s["passes"] == 1 and s["unfinished"] == [] and s["seconds"] > 0
    assert [w["status"] for w in s["workers"]] == ["finished"] * 3
    assert all(w["stored"] > 0 for w in s["workers"]), s["workers"]
    assert sum(w["stored"] for w in s["workers"]) == 36
    assert sorted(e for w in s["workers"] for e in w["endpoints"]) == sorted(
        [engines[0], engines[1], engines[0]])
    assert len({w["writer_ids"][0] for w in s["workers"]}) == 3
    assert sorted(v["sample_id"] for v in s["samples"]) == sorted(ids_of(items, 2))
    assert s["check"]["samples"] == 36 and s["check"]["rejected"] == 0
    # one progress bar's worth of updates, ending at the total
    assert seen[-1] == (36, 36) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    reader = assert_each_stored_once(out, ids_of(items, 2))
    for p in items[:3]:  # the routing rows cover prompt and completion
        s0 = reader[f"{p.prompt_id}/0"]
        assert list(s0.tokens[: len(p.input_ids)]) == list(p.input_ids)
        assert s0.rows == s0.num_tokens - 1 - s0.routed_start


def test_a_killed_worker_loses_nothing_and_stores_nothing_twice(
        cluster: Any, engines: list[str], s3_server: Any) -> None:
    """On an S3 dataset (the loopback server): the object store, where a dead writer leaves
    unlisted objects at most."""
    items = prompts(24)
    out = s3_server.fresh_uri(label="ray-kill")
    handles: list[Any] = []
    killed: list[int] = []

    def kill_first_worker(done: int, total: int, _: dict) -> None:
        if not killed:  # at the first published chunk: the others are still running
            ray.kill(handles[0], no_restart=True)
            killed.append(done)

    s = collect_on_ray(endpoints=engines, engine="sglang", prompts=items, geometry=GEOMETRY,
                       out=out, workers=2, samples_per_prompt=2, params=PARAMS, concurrency=4,
                       total_prompts=len(items), num_cpus=0.5, samples_per_shard=1000,
                       chunk_prompts=2, on_start=handles.extend,
                       on_progress=kill_first_worker)
    assert killed and killed[0] < 48
    w0 = s["workers"][0]
    assert w0["status"] == "died" and w0["error"], w0
    assert s["workers"][1]["status"] == "finished"
    # the dead worker's unpublished prompts were collected again by the survivor, which
    # took over both endpoints (one transport, each request to the next endpoint)
    assert sorted(s["workers"][1]["endpoints"]) == sorted(engines)
    assert len(s["workers"][1]["writer_ids"]) == 2  # a fresh writer for the second pass
    assert s["passes"] == 2 and s["unfinished"] == []
    t = s["totals"]
    assert t["prompts"] == 24 and t["rejected"] == 0 and t["failed"] == 0
    assert t["stored"] + t["samples_already_stored"] == 48
    assert_each_stored_once(out, ids_of(items, 2))


def _cli_collect(address: str, engines: list[str], prompt_file: Path, out: str,
                 *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    args = ["collect", "--ray", address, "--workers", "2", "--worker-cpus", "0.5",
            "--engine", "sglang", "--prompts", str(prompt_file), "--model", "tiny-qwen3-moe",
            "--out", out, "-G", "2", "--max-new-tokens", "4", "--concurrency", "4", "--json",
            *extra]
    for e in engines:
        args += ["--endpoint", e]
    proc = subprocess.run(cli(*args), capture_output=True, text=True, cwd=ROOT,
                          env=env or child_env(), timeout=300)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {
        "stderr": proc.stderr[-3000:]}


def _write_prompts(path: Path, items: list[Prompt]) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": p.prompt_id, "input_ids": list(p.input_ids)})
                            + "\n" for p in items))
    return path


def test_cli_collect_ray_resumes_across_workers(cluster: Any, engines: list[str],
                                               tmp_path: Path) -> None:
    first, more = prompts(8), prompts(8, start=8)
    out = str(tmp_path / "ds")
    code, s = _cli_collect(cluster.address, engines[:1], _write_prompts(tmp_path / "a.jsonl",
                                                                         first), out)
    assert code == 0, s
    assert s["totals"]["stored"] == 16 and len(s["workers"]) == 2
    # without --resume a dataset that holds samples is refused
    code, s = _cli_collect(cluster.address, engines, _write_prompts(tmp_path / "b.jsonl",
                                                                      first + more), out)
    assert code == 2 and "--resume" in s.get("error", json.dumps(s)), s
    # --ray auto joins $RAY_ADDRESS; other workers, other endpoints: what is stored is skipped
    env = child_env() | {"RAY_ADDRESS": cluster.address}
    code, s = _cli_collect("auto", engines, tmp_path / "b.jsonl", out, "--resume", env=env)
    assert code == 0, s
    t = s["totals"]
    assert (t["prompts"], t["prompts_skipped"], t["stored"], t["samples_already_stored"]) == (
        16, 8, 16, 16), t
    assert sorted(v["sample_id"] for v in s["samples"]) == sorted(ids_of(more, 2))
    assert_each_stored_once(out, ids_of(first + more, 2))


def test_a_two_node_collect_into_s3_trains_two_gloo_ranks_with_replay(
        cluster: Any, engines: list[str], s3_server: Any, tmp_path: Path) -> None:
    """The whole many-machine trip: Ray workers on two nodes collect GRPO groups from two
    engines into one S3 dataset; two data-parallel ranks (torchrun, gloo) train from that URI
    with routing replay, each reading only its planned share."""
    pytest.importorskip("megatron.core", reason="training needs the megatron extra")
    from replay_bridge.client import free_port

    items = prompts(8)
    out = s3_server.fresh_uri(label="ray-to-trainer")
    s = collect_on_ray(endpoints=engines, engine="sglang", prompts=items, geometry=GEOMETRY,
                       out=out, workers=2, samples_per_prompt=2, params=PARAMS, concurrency=4,
                       total_prompts=len(items), num_cpus=0.5)
    assert s["totals"]["stored"] == 16 and {w["host"] for w in s["workers"]}
    reader = assert_each_stored_once(out, ids_of(items, 2))
    groups = {sid: g for sid, g in zip(reader.index.column("sample_id").to_pylist(),
                                       reader.index.column("group_id").to_pylist())}
    log = tmp_path / "log.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "replay_recipes.grpo_megatron", "--cpu", "--vocab-size", "512",
           "--routing-replay", "--routing-replay-shards", out, "--steps", "2",
           "--groups-per-step", "4", "--seed", "3", "--log-json", str(log)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env() | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(log.read_text())
    assert doc["world_size"] == 2 and len(doc["steps"]) == 2
    for rec in doc["steps"]:
        assert rec["metrics"]["routing_replay/tokens"] > 0
        read = [rec["ranks"][r]["read"] for r in range(2)]
        assert all(read) and not set(read[0]) & set(read[1])
        for r in range(2):  # every group of a rank's share whole, and only there
            for sid in read[r]:
                mates = {i for i, g in groups.items() if g == groups[sid]}
                assert mates <= set(read[r])
        assert rec["ranks"][0]["weights"] == rec["ranks"][1]["weights"]
