"""The one switch (``routing_replay:`` YAML, ``--routing-replay ...`` flags) selects the
``transformers`` hook with ``trainer: hf``: parsed in one place for both hooks, built from a
config over a tiny model, guarded and measured as the hook built directly."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import trainer_hooks
import trainer_hooks.hf as hf
import trainer_hooks.megatron as mg
from replay_bridge.layout import LayoutError
from tests.trainer_hooks.hf import support as S


def test_one_parser_for_both_hooks() -> None:
    for name in ("ReplayOptions", "add_routing_replay_args", "options_from_args",
                 "options_from_config"):
        assert getattr(hf, name) is getattr(mg, name) is getattr(trainer_hooks, name)


def test_flags_and_yaml_parse_both_trainers() -> None:
    p = trainer_hooks.add_routing_replay_args(argparse.ArgumentParser())
    assert trainer_hooks.options_from_args(p.parse_args([])).trainer == "megatron"
    o = trainer_hooks.options_from_args(p.parse_args([
        "--routing-replay", "--routing-replay-trainer", "hf", "--routing-replay-shards", "/s",
        "--routing-replay-packing", "bshd"]))
    assert o == trainer_hooks.ReplayOptions(enabled=True, shards="/s", packing="bshd",
                                            trainer="hf")
    assert o.hf_packing == "padded" and trainer_hooks.ReplayOptions().hf_packing == "packed"
    y = trainer_hooks.options_from_config(
        {"routing_replay": {"enabled": True, "trainer": "hf", "shards": "/s",
                            "packing": "bshd"}})
    assert y == o
    assert trainer_hooks.options_from_args(
        p.parse_args([], namespace=argparse.Namespace(**trainer_hooks.args_from_options(o)))) == o
    m = trainer_hooks.options_from_config({"routing_replay": {"enabled": True, "shards": "/s"}})
    assert m.trainer == "megatron"


def test_unknown_trainer_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"routing_replay.trainer 'fsdp' is not a trainer this "
                                         r"library hooks; known: megatron, hf"):
        trainer_hooks.options_from_config({"routing_replay": {"enabled": True,
                                                              "trainer": "fsdp"}})
    p = trainer_hooks.add_routing_replay_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        p.parse_args(["--routing-replay-trainer", "fsdp"])


def test_hf_refuses_megatron_only_settings_and_the_other_builder() -> None:
    with pytest.raises(ValueError, match="pad_multiple is a megatron THD setting"):
        trainer_hooks.ReplayOptions(enabled=True, trainer="hf", pad_multiple=8)
    # bshd needs seq_length for megatron only: the hf grid is the batch's own.
    assert trainer_hooks.ReplayOptions(enabled=True, trainer="hf", packing="bshd")
    with pytest.raises(hf.ReplayConfigError, match=r"trainer is 'hf'.*trainer_hooks.hf"):
        mg.build_routing_replay(trainer_hooks.ReplayOptions(enabled=True, trainer="hf"), None)
    with pytest.raises(hf.ReplayConfigError, match=r"trainer is 'megatron'.*not the hf one"):
        hf.build_routing_replay(trainer_hooks.ReplayOptions(enabled=True), None)
    assert trainer_hooks.build_routing_replay(trainer_hooks.ReplayOptions(trainer="hf"),
                                              None) is None
    with pytest.raises(ValueError, match="no shard directory"):
        trainer_hooks.build_routing_replay(
            trainer_hooks.ReplayOptions(enabled=True, trainer="hf"), None)


@pytest.mark.parametrize("packing", ["bshd", "thd"])
def test_a_config_builds_the_hf_replay_with_its_guards_and_metrics(packing) -> None:
    model = S.build_model("qwen3_moe")
    geometry = hf.model_geometry(model)
    samples = S.make_samples(geometry, [9, 6, 7], seed=3)
    source = {s.sample_id: s for s in samples}
    options = trainer_hooks.options_from_config({"routing_replay": {
        "enabled": True, "trainer": "hf", "packing": packing, "validate_ids": True}})
    replay = trainer_hooks.build_routing_replay(options, model, source=source,
                                                geometry=geometry)
    assert isinstance(replay, hf.RoutingReplay)
    assert replay.packing == ("packed" if packing == "thd" else "padded")
    try:
        ids = [s.sample_id for s in samples]
        if packing == "thd":
            batch = S.packed_batch(samples)
            mb = replay.prepare(ids, position_ids=batch["position_ids"])
        else:
            batch = S.padded_batch(samples, 10, "left")
            mb = replay.prepare(ids, attention_mask=batch["attention_mask"])
        capture = S.ExpertsCapture(model)
        try:
            with replay.replaying(mb), torch.no_grad():
                model(**batch)
        finally:
            capture.close()
        host = mb.host
        for i, layer in enumerate(replay.layers):
            used = capture.calls[layer][0]["ids"].numpy()
            rows = host.region < hf.PAD
            assert np.array_equal(np.sort(used[rows], -1),
                                  np.sort(host.ids[rows, i, :].astype(np.int64), -1))
        figures = replay.metrics()
        assert figures["routing_replay/tokens"] == (sum(s.num_tokens - 1 for s in samples)
                                                   * geometry.num_moe_layers)  # (token, layer)
        assert 0.0 <= figures["routing_replay/exact"] < 1.0  # random ids: own top-k differs
        # The hook's guards run the same through the switch: a sample the source lacks, ...
        with pytest.raises(hf.MissingSample):
            replay.prepare(["nope"], attention_mask=torch.ones(1, 4), packing="padded")
        # ... and a repeated id.
        bad = samples[0].routed.copy()
        bad[0, 0, 1] = bad[0, 0, 0]
        source["dup"] = type(samples[0])(sample_id="dup", tokens=samples[0].tokens,
                                         prompt_len=samples[0].prompt_len, routed=bad)
        with pytest.raises(LayoutError, match="dup"):
            replay.prepare(["dup"], attention_mask=torch.ones(1, samples[0].num_tokens),
                           packing="padded")
    finally:
        replay.close()
    assert hf.build_routing_replay(
        trainer_hooks.ReplayOptions(enabled=True, trainer="hf"), model, source=source,
        geometry=geometry).close() is None  # the routers are free again after close()
