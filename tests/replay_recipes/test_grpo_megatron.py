"""The GRPO recipe's trainer configs: every key of a shipped config is read (the loader refuses
any other), its values reach the run, and flags on the command line win."""

from __future__ import annotations

import pytest
import yaml

from replay_recipes import grpo_megatron as G
from tests.support.processes import ROOT
from trainer_hooks.megatron import options_from_args, options_from_config

CONFIGS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"grpo-tiny-cpu.yaml", "grpo-qwen3-30b-a3b.yaml",
                                         "grpo-replay-off.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_is_read(path):
    data = yaml.safe_load(path.read_text())
    args = G.parse_args(["--config", str(path)])  # the strict loader raises on unread keys
    for section in ("model", "train"):
        for key, value in (data.get(section) or {}).items():
            assert getattr(args, key) == value, f"{path.name}: {section}.{key}"
    assert options_from_args(args) == options_from_config(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("parallel: {tensor_model_parallel_size: 2}", r"unknown section\(s\) \['parallel'\]"),
        ("model: {preset: qwen3-30b-a3b}", r"unknown model key\(s\) \['preset'\]"),
        ("train: {steps: 2, warmup: 1}", r"unknown train key\(s\) \['warmup'\]"),
        ("routing_replay: {enabled: true, shard: x}", r"unknown routing_replay keys \['shard'\]"),
        ("model: {num_layers: 2.5}", r"model\.num_layers must be a int, got 2\.5"),
        ("train: {recompute: 'yes'}", r"train\.recompute must be true or false"),
        ("model: [1, 2]", r"section model: must be a mapping"),
    ],
)
def test_the_loader_refuses_keys_nobody_reads(tmp_path, text, error):
    path = tmp_path / "trainer.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        G.parse_args(["--config", str(path)])


def test_flags_win_over_the_config(tmp_path):
    path = tmp_path / "trainer.yaml"
    path.write_text("model: {num_layers: 3, hidden_size: 32}\ntrain: {lr: 1.0e-3}\n"
                    "routing_replay: {enabled: true, shards: a, agreement: false}\n")
    args = G.parse_args(["--config", str(path), "--num-layers", "2",
                         "--routing-replay-shards", "b"])
    assert (args.num_layers, args.hidden_size, args.lr) == (2, 32, 1e-3)
    o = options_from_args(args)
    assert o.enabled and o.shards == "b" and not o.agreement
    assert G.parse_args([]).num_layers == 4  # no config: the built-in defaults

