"""FSDP2 on two ranks (gloo on CPUs): ``tests/trainer_hooks/hf/fsdp2_ranks.py`` under torchrun,
Qwen3-MoE and DeepSeek-V3, each rank with its own padded and packed micro-batches, replay on,
two SGD steps (the second with gradient checkpointing). The rank script checks, against
pre-hooks on the experts modules, that the experts got the stored ids on every data row of
every call (forward and recompute) on both ranks and the router's own routing on pad and
native rows, that agreement is summed over the group, that the parameters after each step are
those of an unsharded run of both ranks' micro-batches and the same on both ranks, and that
replay off disagrees; here its JSON is read again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from replay_bridge.client import free_port
from tests.support.processes import ROOT, child_env

pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")


@pytest.mark.slow
def test_fsdp2_two_gloo_ranks_replay_every_data_row(tmp_path) -> None:
    out = tmp_path / "fsdp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "tests.trainer_hooks.hf.fsdp2_ranks", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env() | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["failures"] == []
    assert [fam[0]["family"] for fam in res["families"]] == ["qwen3_moe", "deepseek_v3"]
    for fam in res["families"]:
        assert [r["rank"] for r in fam] == [0, 1]
        for step in range(2):
            digests = {r["steps"][step]["params_digest"] for r in fam}
            assert len(digests) == 1
            tokens = 0
            for r in fam:
                st = r["steps"][step]
                assert st["gradient_checkpointing"] == (step == 1)
                assert st["max_abs_diff_vs_unsharded"] <= 1e-5 < st["max_param_change"]
                assert all(g > 0 for g in st["router_grad_norms"])
                for m in st["micro_batches"].values():
                    assert m["calls_per_layer"] == (2 if step else 1)
                    assert m["data_rows"] > 0 and m["data_rows_equal"] == m["data_rows"]
                    assert m["native_rows"] > 0 and m["own_rows_equal"] == m["own_rows"]
                    tokens += m["data_rows"] // m["calls_per_layer"]
            # Agreement summed over the group: both ranks' data rows, counted once.
            m = fam[0]["steps"][step]["metrics"]
            assert m == fam[1]["steps"][step]["metrics"]
            assert m["routing_replay/tokens"] == tokens and m["routing_replay/native/tokens"] > 0
        for r in fam:
            assert r["replay_off"]["data_rows_equal"] < 0.5 * r["replay_off"]["data_rows"]
    assert "experts got the stored ids" in proc.stdout
