"""The loader under expert and pipeline parallelism (2 ranks): equal logits and routing.

Each case starts ``tests/trainer_hooks/megatron/convert/multirank.py`` under torchrun: on the CPU with gloo (expert
parallel with the allgather dispatcher), and on 2 GPUs with NCCL (alltoall dispatcher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.support.processes import ROOT


_CPU = ("cpu", [pytest.mark.slow])
_CUDA = ("cuda", [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                       reason="needs 2 CUDA GPUs")])
# megatron-core sets up a tied output layer on a later pipeline stage with .cuda(): GPUs only
CASES = [
    pytest.param(layout, backend, marks=marks, id=f"{layout}-{backend}")
    for layout, backends in (
        ("ep2", (_CPU, _CUDA)), ("pp2", (_CPU, _CUDA)), ("pp2-tied", (_CUDA,))
    )
    for backend, marks in backends
]


@pytest.mark.parametrize(("layout", "backend"), CASES)
def test_loader_under_model_parallelism(layout, backend, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.trainer_hooks.megatron.convert.multirank", layout, str(tmp_path / "ckpt")]
    cmd += ["--cpu"] if backend == "cpu" else []
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(r) for r in results))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["ok"] for r in results)
    if layout == "ep2":
        assert sorted(r["local_experts"] for r in results) == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert all("max_abs_logit_diff" in r for r in results)
    else:
        assert sorted(r["layers"] for r in results) == [[1, 2], [3, 4]]
        assert sum("max_abs_logit_diff" in r for r in results) == 1
