"""The GPU overhead benchmark of the Hugging Face hook (``scripts/gpu/hf_replay_overhead.py``)
runs end to end on a CPU at tiny sizes, so it does not rot between GPU runs. Only the shape of
its JSON is checked, never a timing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.support.processes import ROOT

SCRIPT = ROOT / "scripts" / "gpu" / "hf_replay_overhead.py"
ARMS = ["off", "on", "on_prelaid", "on_no_agreement"]


def _load(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: its folder's modules import
    spec = importlib.util.spec_from_file_location("hf_replay_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--packing", "packed", "--grad-ckpt", "--optimizer"]],
                         ids=["padded", "packed-ckpt-adamw"])
def test_tiny_cpu_run_writes_the_json(tmp_path: Path, extra: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.json"
    result = _load(monkeypatch).main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--steps", "2",
                           "--json", str(out), *extra])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("device", "torch", "transformers", "model", "batch", "step", "steps", "arms",
                "timer", "median_ms", "p10_ms", "p90_ms", "overhead_pct", "paired_overhead_pct",
                "paired_overhead_p10_p90_pct", "wall_median_ms", "kernel_ms_per_step",
                "host_syncs_per_step", "prepare_ms", "agreement", "step_ms",
                "perturbed_row_fraction", "expert_load"):
        assert key in saved, key
    assert saved["arms"] == ARMS
    assert set(saved["median_ms"]) == set(ARMS)
    assert set(saved["overhead_pct"]) == set(ARMS[1:])
    assert all(len(v) == 2 for v in saved["step_ms"].values())
    assert saved["model"]["family"] == "qwen3_moe"
    assert saved["model"]["attn_implementation"] == "sdpa"
    # replay really fed (perturbed) routing: tokens were counted and some rows differ
    assert saved["agreement"]["tokens"] > 0
    assert 0.0 < saved["perturbed_row_fraction"] < 1.0
    assert saved["agreement"]["exact"] < 1.0
    if extra:
        assert saved["batch"]["packing"] == "packed" and saved["grad_ckpt"]
        assert saved["optimizer"]
