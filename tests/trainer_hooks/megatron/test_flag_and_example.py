"""The replay flag (argparse and YAML) and the example GRPO script, end to end on a CPU."""

from __future__ import annotations

import argparse

import pytest

from trainer_hooks.megatron import (
    Packing,
    ReplayOptions,
    add_routing_replay_args,
    build_routing_replay,
    options_from_args,
    options_from_config,
)
from tests.support.processes import ROOT

CONFIGS = ROOT / "configs" / "trainer"


def test_argparse_flag_defaults_off_and_parses_everything():
    p = add_routing_replay_args(argparse.ArgumentParser())
    assert options_from_args(p.parse_args([])) == ReplayOptions()
    o = options_from_args(p.parse_args([
        "--routing-replay", "--routing-replay-shards", "/s", "--routing-replay-packing", "bshd",
        "--routing-replay-seq-length", "128", "--routing-replay-no-agreement",
        "--routing-replay-skip-id-check", "--routing-replay-allow-token-dropping"]))
    assert o == ReplayOptions(True, "/s", "bshd", 128, 0, False, False, True)
    assert o.packing_for() == Packing.bshd(128)


def test_thd_pad_multiple_follows_the_parallel_layout():
    o = ReplayOptions(enabled=True)
    assert o.packing_for(tp=2, cp=1, sequence_parallel=True).pad_multiple == 2
    assert o.packing_for(tp=2, cp=2, sequence_parallel=True).pad_multiple == 8
    assert o.packing_for(tp=2, cp=2, sequence_parallel=False).pad_multiple == 4
    assert ReplayOptions(pad_multiple=16).packing_for(tp=2).pad_multiple == 16


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_trainer_configs_parse(name):
    o = options_from_config(CONFIGS / name)
    assert o.enabled == (name != "grpo-replay-off.yaml")


def test_yaml_section_errors_and_forms():
    with pytest.raises(ValueError, match=r"unknown routing_replay keys \['shard'\]"):
        options_from_config({"routing_replay": {"enabled": True, "shard": "x"}})
    with pytest.raises(ValueError, match="bshd packing needs seq_length"):
        options_from_config({"routing_replay": {"enabled": True, "packing": "bshd"}})
    assert options_from_config({"routing_replay": True}).enabled
    assert not options_from_config({"trainer": {}}).enabled
    assert build_routing_replay(ReplayOptions(), model=None) is None
    with pytest.raises(ValueError, match="no shard directory"):
        build_routing_replay(ReplayOptions(enabled=True), model=None)


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("packing", ["thd", "bshd"])
def test_example_grpo_script_trains_with_replay_from_shards(tmp_path, packing, monkeypatch):
    from replay_recipes import grpo_megatron

    shards = tmp_path / "shards"
    argv = ["--cpu", "--make-demo-shards", str(shards), "--routing-replay",
            "--routing-replay-shards", str(shards), "--steps", "2", "--recompute",
            "--routing-replay-packing", packing, "--routing-replay-seq-length", "32"]
    m = grpo_megatron.main(argv)
    # Two groups of 4 samples a step; every completion and prompt row replayed per layer.
    assert m["routing_replay/tokens"] > 0
    assert m["routing_replay/prompt/tokens"] > 0 and m["routing_replay/completion/tokens"] > 0
    assert set(k for k in m if k.endswith("/exact") and "layer" in k) == {
        f"routing_replay/layer{i}/exact" for i in range(4)}
    assert m["loss"] == m["loss"]  # finite


@pytest.mark.usefixtures("megatron_cpu")
def test_example_grpo_script_runs_from_the_tiny_config(tmp_path):
    """The shipped CPU config drives the run: its model (4 MoE layers) and a train: section."""
    import yaml

    from replay_recipes import grpo_megatron

    config = yaml.safe_load((CONFIGS / "grpo-tiny-cpu.yaml").read_text())
    config["routing_replay"]["shards"] = str(tmp_path / "shards")
    config["train"] = {"steps": 1, "micro_batch_samples": 4}
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(config))
    m = grpo_megatron.main(["--cpu", "--config", str(path),
                            "--make-demo-shards", str(tmp_path / "shards")])
    assert m["step"] == 0.0  # one step, from train.steps
    assert {k for k in m if k.endswith("/exact") and "layer" in k} == {
        f"routing_replay/layer{i}/exact" for i in range(4)}
    assert m["routing_replay/tokens"] > 0 and m["loss"] == m["loss"]


@pytest.mark.usefixtures("megatron_cpu")
def test_build_from_shards_looks_samples_up_by_id(tmp_path):
    import numpy as np

    from tests.trainer_hooks.megatron import support as S
    from replay_bridge.shards import ShardWriter
    from trainer_hooks.megatron import MissingSample, model_geometry

    model = S.build_model()
    geo = model_geometry(model.config)
    samples = S.make_samples(geo, [7, 5, 9], seed=9)
    with ShardWriter(tmp_path / "shards", geo) as w:
        for s in samples:
            w.add(s)
    replay = build_routing_replay(
        ReplayOptions(enabled=True, shards=str(tmp_path / "shards")), model)
    assert replay is not None and replay.packing == Packing.thd(1)
    mb = replay.prepare(["s2", "s0"])
    np.testing.assert_array_equal(mb.host.ids[:8], samples[2].routed)
    np.testing.assert_array_equal(mb.host.ids[9:15], samples[0].routed)
    with pytest.raises(MissingSample, match="sample 's9'"):
        replay.prepare(["s9"])
    replay.close()
