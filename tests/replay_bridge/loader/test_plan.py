"""The step plan: groups whole, every sample on exactly one rank, token balance, determinism
for (seed, step) whatever the storage order, epochs of ``groups_per_step``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge.layout import Packing
from replay_bridge.loader import LoaderError, RankLoader, StepPlan, plan_step
from tests.support.processes import ROOT

from .helpers import MemoryReader, index_of, make_samples

THD = Packing.thd()


def plan(samples, world, **kw) -> StepPlan:
    kw.setdefault("micro_batch_size", 2)
    return plan_step(index_of(samples), world_size=world, packing=kw.pop("packing", THD), **kw)


def check_partition(p: StepPlan, samples) -> None:
    """Every sample of the step on exactly one rank, each group on one rank, every rank some
    samples, and any two ranks within the largest group's tokens of each other."""
    by_id = {s.sample_id: s for s in samples}
    ids = [i for r in range(p.world_size) for i in p.ids(r)]
    assert len(ids) == len(set(ids))
    rank_of = {i: r for r in range(p.world_size) for i in p.ids(r)}
    groups: dict[str, set[int]] = {}
    for i in ids:
        s = by_id[i]
        groups.setdefault(s.group_id or f"solo:{i}", set()).add(rank_of[i])
    assert all(len(r) == 1 for r in groups.values()), groups
    tokens = p.tokens_per_rank()
    assert (tokens > 0).all()
    assert tokens.sum() == sum(by_id[i].num_tokens for i in ids)
    group_tokens: dict[str, int] = {}
    for i in ids:
        key = by_id[i].group_id or f"solo:{i}"
        group_tokens[key] = group_tokens.get(key, 0) + by_id[i].num_tokens
    assert tokens.max() - tokens.min() <= max(group_tokens.values())


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=0, max_size=30),
    solo=st.integers(0, 12),
    world=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    step=st.integers(0, 1000),
    data_seed=st.integers(0, 100),
)
def test_every_sample_once_groups_whole_balanced(sizes, solo, world, seed, step, data_seed):
    samples = make_samples(sizes, solo, seed=data_seed)
    if len(sizes) + solo < world:
        if samples:
            with pytest.raises(LoaderError, match="fewer than the"):
                plan(samples, world, seed=seed, step=step)
        return
    p = plan(samples, world, seed=seed, step=step)
    check_partition(p, samples)
    assert sorted(p.sample_id.to_pylist()) == sorted(s.sample_id for s in samples)
    assert set(p.to_table().column_names) == {"sample_id", "group", "rank", "micro_batch",
                                              "tokens"}


def test_balance_on_a_realistic_step():
    """512 GRPO groups of 8 on 16 ranks: within the largest group's tokens (the bound), and
    in practice well within 1% of a rank's share."""
    rng = np.random.default_rng(3)
    samples = make_samples([8] * 512, seed=4, lengths=(64, 2048))
    p = plan(samples, 16, seed=int(rng.integers(1 << 30)))
    check_partition(p, samples)
    t = p.tokens_per_rank()
    assert (t.max() - t.min()) / t.mean() < 0.01


def test_group_id_equal_to_a_solo_sample_id_are_two_groups():
    samples = make_samples([3], solo=1)
    samples[-1].sample_id = "G0"  # a solo sample whose id is another group's id
    p = plan(samples, 2)
    check_partition(p, samples)
    assert p.group.to_pylist().count("G0") == 4
    assert sorted(map(len, (p.ids(0), p.ids(1)))) == [1, 3]


def test_determinism_for_seed_and_step_whatever_the_storage_order():
    samples = make_samples([4] * 12, solo=5, seed=1)
    shuffled = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    a, b = plan(samples, 4, seed=7, step=3), plan(shuffled, 4, seed=7, step=3)
    assert a.to_dict() == b.to_dict()
    assert a.to_table().equals(b.to_table())
    assert plan(samples, 4, seed=7, step=4).to_dict() != a.to_dict()
    assert plan(samples, 4, seed=8, step=3).to_dict() != a.to_dict()
    # Over steps, every group visits more than one rank (the deal is reseeded each step).
    ranks: dict[str, set[int]] = {}
    for step in range(8):
        p = plan(samples, 4, seed=7, step=step)
        for g, r in zip(p.group.to_pylist(), p.rank.tolist()):
            ranks.setdefault(g, set()).add(r)
    assert all(len(r) > 1 for r in ranks.values())


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.replay_bridge.loader.helpers import index_of, make_samples
from replay_bridge.layout import Packing
from replay_bridge.loader import plan_step
p = plan_step(index_of(make_samples([4] * 12, solo=5, seed=1)), world_size=3,
              packing=Packing.thd(), max_tokens=64, seed=11, step=5, groups_per_step=9)
print(json.dumps(p.to_dict()))
"""


def test_the_same_plan_in_another_process():
    """What every rank relies on without talking to the others: a fresh interpreter (another
    hash seed) plans the same step."""
    want = plan(make_samples([4] * 12, solo=5, seed=1), 3, micro_batch_size=None, max_tokens=64,
                seed=11, step=5, groups_per_step=9).to_dict()
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT)], capture_output=True,
                             text=True, timeout=120, cwd=ROOT,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == want


def test_groups_per_step_walks_epochs_of_shuffled_groups():
    samples = make_samples([2] * 10, solo=3, seed=2)  # 13 groups, 4 a step: 3 steps an epoch
    seen = []
    for step in range(6):
        p = plan(samples, 2, seed=5, step=step, groups_per_step=4)
        groups = set(p.group.to_pylist())
        assert len(groups) == 4
        check_partition(p, samples)
        seen.append(groups)
    for epoch in (seen[:3], seen[3:]):
        assert not (epoch[0] & epoch[1]) and not (epoch[1] & epoch[2]) and not (
            epoch[0] & epoch[2])
        assert len(set().union(*epoch)) == 12
    assert seen[:3] != seen[3:]  # each epoch its own shuffle
    with pytest.raises(LoaderError, match="groups_per_step must be in"):
        plan(samples, 2, groups_per_step=14)


def test_micro_batches_by_count_and_by_token_budget():
    samples = make_samples([3] * 6, solo=4, seed=3)
    by_id = {s.sample_id: s for s in samples}
    p = plan(samples, 2, micro_batch_size=3, seed=1)
    for r in range(2):
        mbs = p.micro_batches(r)
        assert [len(m) for m in mbs[:-1]] == [3] * (len(mbs) - 1) and 1 <= len(mbs[-1]) <= 3
        assert sum(mbs, []) == p.ids(r)
    assert p.micro_batches_per_rank().tolist() == [len(p.micro_batches(r)) for r in range(2)]

    packing = Packing.thd(pad_multiple=8)
    p = plan(samples, 2, packing=packing, micro_batch_size=None, max_tokens=100, seed=1)
    for r in range(2):
        mbs = p.micro_batches(r)
        assert sum(mbs, []) == p.ids(r)
        padded = [[-(-by_id[i].num_tokens // 8) * 8 for i in m] for m in mbs]
        assert all(sum(x) <= 100 for x in padded)
        # next-fit: the next micro-batch's first sample did not fit in this one
        assert all(sum(a) + b[0] > 100 for a, b in zip(padded, padded[1:]))


@pytest.mark.parametrize(("kw", "error"), [
    (dict(micro_batch_size=None), "exactly one of"),
    (dict(max_tokens=64), "exactly one of"),
    (dict(micro_batch_size=0), "micro_batch_size must be >= 1"),
    (dict(micro_batch_size=None, max_tokens=64, packing=Packing.bshd(64)), "needs thd"),
    (dict(micro_batch_size=None, max_tokens=8), r"takes \d+ padded tokens, more than max_tok"),
    (dict(packing=Packing.bshd(8)), r"tokens, more than the bshd seq_length 8"),
    (dict(step=-1), "must be >= 0"),
])
def test_plans_that_cannot_be_made(kw, error):
    with pytest.raises(LoaderError, match=error):
        plan(make_samples([3] * 4, seed=0, lengths=(10, 20)), 2, **kw)


def test_bad_indexes_and_ranks():
    samples = make_samples([2, 2])
    with pytest.raises(LoaderError, match="lists a sample id twice"):
        plan_step(pa.concat_tables([index_of(samples)] * 2), world_size=1, packing=THD,
                  micro_batch_size=1)
    with pytest.raises(LoaderError, match="no samples"):
        plan([], 1)
    with pytest.raises(LoaderError, match="rank 2 is outside a world of 2"):
        RankLoader(MemoryReader(samples), world_size=2, rank=2, packing=THD, micro_batch_size=1)
