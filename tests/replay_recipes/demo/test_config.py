"""The demo's YAML configuration: defaults, overrides, and clear errors."""

from __future__ import annotations

import pytest

from replay_recipes.demo.config import DEFAULT_CONFIG, ConfigError, DemoConfig, load_config


def test_packaged_default_matches_the_dataclass_defaults():
    assert DEFAULT_CONFIG.exists()
    assert load_config() == DemoConfig()


def test_sets_and_overrides_apply_in_order(tmp_path):
    cfg = load_config(sets=["train.steps=2", "collect.temperature=0.7", "out=x"],
                      overrides={"train.steps": 3, "collect.prompts": None})
    assert cfg.train.steps == 3  # overrides come last
    assert cfg.collect.temperature == 0.7
    assert cfg.collect.prompts == DemoConfig().collect.prompts  # None leaves the value
    assert str(cfg.out_dir) == "x"


def test_a_config_file_replaces_the_default(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text("collect:\n  prompts: 2\n  samples_per_prompt: 2\ntrain:\n  lr: 1\n")
    cfg = load_config(p)
    assert (cfg.collect.prompts, cfg.collect.samples_per_prompt) == (2, 2)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("sets, match", [
    (["train.bogus=1"], "train.bogus"),
    (["collect.prompts=many"], "collect.prompts must be a int"),
    (["collect.prompts=0"], "collect.prompts must be >= 1"),
    (["collect.samples_per_prompt=1"], "samples_per_prompt must be >= 2"),
    (["engine.kind=sglang"], "engine.kind must be one of"),
    (["engine.kind=vllm"], "needs engine.endpoint"),
    (["engine.kind=vllm", "engine.endpoint=http://h:1"], "model.dir"),
    (["engine.kind=vllm", "engine.start_vllm=true", "collect.temperature=0.5"], "temperature"),
    (["engine.endpoint=http://h:1"], "need engine.kind=vllm"),
    (["engine.kind=vllm", "engine.endpoint=h:1", "model.dir=m"], "http"),
    (["train.reward_vocab_fraction=1.5"], "reward_vocab_fraction"),
    (["steps"], "section.key=value"),
    (["model.dir=5"], "model.dir must be a string"),
    (["train.steps.x=1"], "not a section"),
    (["collect.routed_start=-1"], "routed_start must be >= 0"),
])
def test_bad_settings_are_named(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(sets=sets)


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
