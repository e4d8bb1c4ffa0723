"""Multi-rank layouts (TP2 + sequence parallel, CP2, PP2 with virtual pipeline, EP2 all-to-all,
TP2 + SP + EP2, EP2 with a sigmoid router and expert bias; THD packing and full recompute):
two processes over gloo on CPUs, and over NCCL on GPUs. Every layout replays stored rows
exactly and routes native rows (before ``routed_start``, marked native) with the router's own
top-k, as with replay off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replay_bridge.client import free_port
from tests.support.processes import ROOT

SCRIPT = ROOT / "scripts" / "gpu" / "replay_layouts.py"
LAYOUTS = ("tp2_sp_thd", "tp2_sp_bshd", "cp2_thd", "cp2_bshd", "pp2_vpp2_thd", "ep2_alltoall_thd",
           "tp2_sp_ep2_thd", "ep2_sigmoid_bias_thd")


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "layouts.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(SCRIPT), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_exact(summary: dict) -> None:
    assert set(summary["results"]) == set(LAYOUTS)
    for name, ranks in summary["results"].items():
        assert len(ranks) == 2, name
        native = 0
        for r in ranks:
            assert "error" not in r, f"{name}: {r.get('error')}\n{r.get('trace')}"
            assert not r["problems"], (name, r["problems"])
            assert r["per_layer"], name
            for layer, s in r["per_layer"].items():
                assert s["rows"] > 0 and s["data_rows"] > 0, (name, layer)
                assert s["rows_replayed"] == s["rows"], (name, r["rank"], layer, s)
                assert s["data_rows_match"] == s["data_rows"], (name, r["rank"], layer, s)
                assert s["native_rows_own"] == s["native_rows"], (name, r["rank"], layer, s)
                assert s["native_rows_off_match"] == s["native_rows_off"], (name, r["rank"], s)
                assert s["native_rows_off"] <= s["native_rows"], (name, r["rank"], layer, s)
                native += s["native_rows"]
            assert r["agreement_native_tokens"] > 0, (name, r["rank"])
        assert native > 0, name
    assert summary["ok"]
    # Pipeline stages hold disjoint layers; the dense layer 0 has no router anywhere.
    pp = summary["results"]["pp2_vpp2_thd"]
    layers = [set(r["layers"]) for r in pp]
    assert not layers[0] & layers[1] and layers[0] | layers[1] == set(range(1, 8))


@pytest.mark.slow
def test_layouts_over_gloo_on_cpus(tmp_path):
    summary = _run(tmp_path, "--cpu")
    assert summary["backend"] == "gloo"
    _assert_exact(summary)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_layouts_over_nccl_on_gpus(tmp_path):
    summary = _run(tmp_path)
    assert summary["backend"] == "nccl"
    _assert_exact(summary)
