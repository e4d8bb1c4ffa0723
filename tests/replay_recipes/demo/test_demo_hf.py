"""``replay-bridge demo --trainer hf --json`` end to end, once, with small sizes: PD reference
engine (bf16) -> shards -> transformers (fp32), GRPO steps with replay off and on through
``trainer_hooks.hf``, measured by pre-hooks on the experts modules (not the hook's code).

As in ``test_demo_run.py``: replay on is exact by construction (asserted == 1.0); replay off
needs at least 4,000 (token, layer) blocks so that a run without a single bf16/fp32 routing
flip stays far below 1e-9 likely.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from replay_recipes.demo.config import TRAINERS, ConfigError, load_config

N, G, STEPS = 6, 4, 2

# The --json object's keys, the same for both trainers ("trainer" names which ran).
KEYS = {"seconds", "ok", "engine", "trainer", "model", "geometry", "precision",
        "samples_requested", "samples_stored", "samples_rejected", "samples_failed",
        "tokens_stored", "completion_tokens", "validation", "weights", "agreement", "k3_kl",
        "logp_abs_diff", "direction", "reward_mean", "steps", "timings", "plot"}


def test_the_trainer_key_is_checked_and_names_the_hooks_trainers() -> None:
    import trainer_hooks

    assert TRAINERS == trainer_hooks.TRAINERS
    assert load_config().train.trainer == "megatron"
    assert load_config(overrides={"train.trainer": "hf"}).train.trainer == "hf"
    with pytest.raises(ConfigError, match=r"train.trainer must be one of megatron, hf, got "
                                          r"'fsdp'"):
        load_config(sets=["train.trainer=fsdp"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("demo-hf") / "out"
    cmd = [sys.executable, "-c", "from replay_bridge.cli import main; main()", "demo", "--json",
           "--trainer", "hf", "--out", str(out), "--prompts", str(N), "--samples", str(G),
           "--max-new-tokens", "48", "--steps", str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, timeout=290)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    return orjson.loads(proc.stdout), out, proc.stderr.decode()


@pytest.mark.slow
def test_json_keys_are_the_megatron_paths(demo_run):
    fig, out, err = demo_run
    assert set(fig) == KEYS
    assert fig["trainer"] == "hf" and fig["ok"] is True
    assert fig["precision"] == {"engine": "bfloat16", "trainer": "float32"}
    assert orjson.loads((out / "demo.json").read_bytes()) == fig
    assert fig["samples_stored"] == N * G and fig["validation"]["ok"] is True
    assert "[6/8] train 2 GRPO steps (transformers, FSDP2), replay off" in err
    assert "[8/8] plot" in err and "engine stopped" in err
    # The replay hooks attached but outside a pass change no logit.
    assert fig["weights"]["max_abs_logit_diff_fp32_vs_transformers"] == 0.0
    png = Path(fig["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow
def test_replay_on_sends_every_token_to_the_rollout_experts(demo_run):
    fig, _, _ = demo_run
    a = fig["agreement"]
    assert a["replay_on"] == 1.0 and a["overlap"]["replay_on"] == 1.0
    assert all(v["replay_on"] == 1.0 for v in a["per_layer"].values())
    assert len(a["per_layer"]) == len(fig["geometry"]["moe_layers"])
    assert all(s["agreement"] == 1.0 for s in fig["steps"]["replay_on"])
    assert 0.5 < a["replay_on_router_own"] <= 1.0


@pytest.mark.slow
def test_replay_off_shows_the_mismatch_replay_removes(demo_run):
    fig, _, _ = demo_run
    a = fig["agreement"]
    assert a["blocks"] >= 4000
    assert 0.9 < a["replay_off"] < 1.0
    assert fig["k3_kl"]["replay_on"] < fig["k3_kl"]["replay_off"]
    assert len(fig["steps"]["replay_off"]) == len(fig["steps"]["replay_on"]) == STEPS


@pytest.mark.slow
def test_native_blocks_are_counted_apart(demo_run):
    fig, _, _ = demo_run
    blocks = N * G * 2 * len(fig["geometry"]["moe_layers"])  # positions 0-1 of every sample
    native = fig["agreement"]["native_blocks"]
    assert native["replay_off"] == native["replay_on"] == blocks
    assert native["replay_on_router_own"] == blocks
