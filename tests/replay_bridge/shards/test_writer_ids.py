"""ShardWriter's ids: ``in`` sees sealed, pending and resumed ids; a duplicate and a sample
that does not fit are refused with two distinct errors, and neither takes the id."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import with_routing
from replay_bridge.shards import DuplicateSample, ShardReader, ShardWriter, UnstorableSample

from .conftest import make_sample


def test_contains_sees_sealed_pending_and_resumed_ids(tiny: RoutingGeometry,
                                                     dataset_uri: str) -> None:
    out = dataset_uri
    with ShardWriter(out, tiny, samples_per_shard=2) as w:
        w.add(make_sample(tiny, "sealed-0", 6, seed=0))
        w.add(make_sample(tiny, "sealed-1", 7, seed=1))  # the second seals shard 0
        assert len(w.manifest.shards) == 1
        w.add(make_sample(tiny, "pending", 8, seed=2))
        assert len(w.manifest.shards) == 1  # still in the open shard
        assert "sealed-0" in w and "sealed-1" in w and "pending" in w
        assert "never-added" not in w and 7 not in w
    with ShardWriter(out, tiny, resume=True) as w:
        assert all(sid in w for sid in ("sealed-0", "sealed-1", "pending"))
        assert "never-added" not in w
        with pytest.raises(DuplicateSample) as e:
            w.add(make_sample(tiny, "pending", 8, seed=3))
        assert e.value.sample_id == "pending" and "already stored" in str(e.value)
    assert sorted(ShardReader(out).sample_ids()) == ["pending", "sealed-0", "sealed-1"]


def test_a_sample_that_does_not_fit_is_unstorable_not_a_duplicate(tiny: RoutingGeometry,
                                                                  tmp_path: Path) -> None:
    good = make_sample(tiny, "s", 9)
    wide = with_routing(good, np.concatenate([good.routed, good.routed[:, :1]], axis=1))
    out_of_range = with_routing(good, good.routed.astype(np.int64) + tiny.num_experts)
    floats = with_routing(good, good.routed.astype(np.float32))
    bad_offsets = dataclasses.replace(good, routed_start=good.prompt_len + 1)
    with ShardWriter(tmp_path / "out", tiny) as w:
        for sample, words in [(wide, "routing shape"), (out_of_range, "expert ids outside"),
                              (floats, "is not integer"), (bad_offsets, "routed_start")]:
            with pytest.raises(UnstorableSample) as e:
                w.add(sample)
            assert not isinstance(e.value, DuplicateSample)
            assert isinstance(e.value, ValueError) and e.value.sample_id == "s"
            assert words in str(e.value) and "'s'" in str(e.value)
            assert "s" not in w  # a refused sample does not take its id
        w.add(good)
        assert "s" in w
        with pytest.raises(DuplicateSample):
            w.add(good)
    assert ShardReader(tmp_path / "out").sample_ids() == ["s"]


def test_claim_then_append_stores_once(tiny: RoutingGeometry, tmp_path: Path) -> None:
    sample = make_sample(tiny, "c", 6)
    with ShardWriter(tmp_path / "out", tiny) as w:
        claimed = w.claim(sample)
        assert "c" in w  # claimed ids count, so a second copy is a duplicate at once
        with pytest.raises(DuplicateSample):
            w.claim(sample)
        with pytest.raises(ValueError, match="not claimed"):
            w.append(make_sample(tiny, "unclaimed", 6))
        w.append(claimed)
    assert ShardReader(tmp_path / "out").sample_ids() == ["c"]
