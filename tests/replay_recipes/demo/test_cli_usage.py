"""``replay-bridge demo`` usage errors: exit 2 with a message, nothing started."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_recipes.demo.engines import EngineError, _stop, running_engine
from replay_recipes.demo.config import EngineConfig
from replay_recipes.demo.rollouts import fresh_shard_dir
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardWriter

runner = CliRunner()


@pytest.mark.parametrize("args, match", [
    (["--engine", "vllm"], "needs engine.endpoint"),
    (["--engine", "vllm", "--endpoint", "http://127.0.0.1:9", "--start-vllm"], "not both"),
    (["--set", "train.nope=1"], "train.nope"),
    (["--samples", "1"], "samples_per_prompt"),
])
def test_usage_errors_exit_2(args, match, tmp_path):
    res = runner.invoke(command_line(), ["demo", "--json", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    err = orjson.loads(res.stdout)
    assert match in err["error"] and err["exit_code"] == 2


def test_an_out_dir_holding_something_else_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    res = runner.invoke(command_line(), ["demo", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "not a shard directory" in orjson.loads(res.stdout)["error"]
    assert (tmp_path / "shards" / "notes.txt").read_text() == "mine"


def test_fresh_shard_dir_removes_only_earlier_shards(tmp_path):
    d = tmp_path / "shards"
    ShardWriter(d, RoutingGeometry.from_preset("tiny-qwen3-moe")).close()
    assert fresh_shard_dir(d) == d and not d.exists()


def test_unreachable_vllm_endpoint(tmp_path):
    cfg = EngineConfig(kind="vllm", endpoint="http://127.0.0.1:9")
    with pytest.raises(EngineError, match="cannot reach"):
        with running_engine(cfg, tmp_path, tmp_path):
            pass


def test_missing_vllm_python(tmp_path):
    cfg = EngineConfig(kind="vllm", start_vllm=True, vllm_python=str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="does not exist"):
        with running_engine(cfg, tmp_path, tmp_path):
            pass


def test_stop_ends_the_process_group_it_started():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    _stop(proc, grace_s=5)
    assert proc.poll() is not None
