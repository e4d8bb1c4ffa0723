"""``replay-bridge demo --json`` end to end, once, with small sizes: PD reference engine (bf16)
-> shards -> megatron-core (fp32), GRPO steps with replay off and on.

Replay on is exact by construction, so its agreement is asserted to be exactly 1.0. Replay off
depends on which tokens the engine sampled (the PD router draws fresh sampling seeds); with
~1% of (token, layer) blocks routed differently in bf16 and fp32 and several thousand blocks
per run, a run without a single flip has a probability far below 1e-9, and the test requires
at least 4,000 blocks so that this stays true.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from replay_bridge.shards import ShardReader, is_dataset

N, G, STEPS = 6, 4, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [sys.executable, "-c", "from replay_bridge.cli import main; main()", "demo", "--json",
           "--out", str(out), "--prompts", str(N), "--samples", str(G),
           "--max-new-tokens", "48", "--steps", str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, timeout=290)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    return orjson.loads(proc.stdout), out, proc


def test_json_has_the_figures(demo_run):
    fig, out, _ = demo_run
    for key in ("seconds", "samples_stored", "agreement", "k3_kl", "plot"):
        assert key in fig
    assert set(fig["agreement"]) >= {"replay_off", "replay_on"}
    assert set(fig["k3_kl"]) == {"replay_off", "replay_on"}
    assert fig["seconds"] < 300
    assert orjson.loads((out / "demo.json").read_bytes()) == fig


def test_every_sample_is_stored_and_validates(demo_run):
    fig, out, _ = demo_run
    assert fig["samples_requested"] == N * G
    assert fig["samples_stored"] == N * G
    assert fig["validation"]["ok"] is True and fig["validation"]["samples"] == N * G
    assert is_dataset(out / "shards") and len(ShardReader(out / "shards")) == N * G


def test_replay_on_routes_exactly_the_rollout_experts(demo_run):
    fig, _, _ = demo_run
    a = fig["agreement"]
    assert a["replay_on"] == 1.0
    assert all(v["replay_on"] == 1.0 for v in fig["agreement"]["per_layer"].values())
    assert all(s["agreement"] == 1.0 for s in fig["steps"]["replay_on"])
    assert len(fig["agreement"]["per_layer"]) == fig["geometry"]["num_layers"]
    # The routers' own choice under replay is measured, not assumed.
    assert 0.5 < a["replay_on_router_own"] <= 1.0


def test_positions_without_rollout_routing_are_native_and_counted_apart(demo_run):
    # The demo asks for routing from prompt position 2 on: positions 0 and 1 of every sample
    # are routed by the trainer's own top-k, replay on or off, and never enter the agreement.
    fig, out, _ = demo_run
    moe_layers = len(fig["geometry"]["moe_layers"])
    assert set(ShardReader(out / "shards").index.column("routed_start").to_pylist()) == {2}
    native = fig["agreement"]["native_blocks"]
    assert native["replay_off"] == native["replay_on"] == N * G * 2 * moe_layers
    assert native["replay_on_router_own"] == N * G * 2 * moe_layers


def test_without_replay_the_bf16_fp32_mismatch_shows(demo_run):
    fig, _, _ = demo_run
    a = fig["agreement"]
    assert a["blocks"] >= 4000
    assert 0.9 < a["replay_off"] < 1.0
    assert fig["k3_kl"]["replay_on"] < fig["k3_kl"]["replay_off"]
    d = fig["logp_abs_diff"]
    assert d["max"]["replay_on"] < d["max"]["replay_off"]
    assert len(fig["steps"]["replay_off"]) == len(fig["steps"]["replay_on"]) == STEPS


def test_trainer_holds_the_engine_weights(demo_run):
    fig, _, _ = demo_run
    assert fig["weights"]["max_abs_logit_diff_fp32_vs_transformers"] < 1e-4
    assert fig["precision"] == {"engine": "bfloat16", "trainer": "float32"}


def test_the_plot_is_a_png(demo_run):
    fig, out, _ = demo_run
    png = Path(fig["plot"])
    assert png == out / "demo.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_progress_goes_to_stderr(demo_run):
    _, _, proc = demo_run
    err = proc.stderr.decode()
    assert "[1/8] checkpoint" in err and "[8/8] plot" in err
    assert "engine stopped" in err


def test_human_output_prints_the_tables_and_the_closing_line(tmp_path):
    """Without ``--json``: the validation table, the off/on comparison, per layer and per step,
    and one closing line quoting the figures (a second, smaller run)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from replay_bridge.cli import main; main()", "demo",
           "--out", str(out), "--prompts", "2", "--samples", "2", "--max-new-tokens", "12",
           "--steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, timeout=290)
    text = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    fig = orjson.loads((out / "demo.json").read_bytes())
    for title in ("shard validation: stored routing re-checked", "step 0 forward",
                  "agreement per MoE layer", "training steps"):
        assert title in text
    assert "with replay 100.00%" in text
    assert f"k3 KL {fig['k3_kl']['replay_off']:.3g} -> {fig['k3_kl']['replay_on']:.3g}" in text
    assert "…" not in text  # nothing truncated when piped
