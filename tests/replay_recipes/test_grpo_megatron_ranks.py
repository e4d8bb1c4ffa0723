"""The GRPO recipe across two data-parallel ranks (gloo on CPUs) from one dataset URI, local
and S3 on loopback, with replay on: each rank reads only its planned share, groups stay whole,
and every replayed block agrees with the rollout's routing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest

from replay_bridge.client import free_port
from tests.support.processes import ROOT, child_env

pytest.importorskip("megatron.core", reason="megatron-core is not installed (extra 'megatron')")


def own_routing_dataset(uri: str, scratch: str) -> None:
    """The recipe's demo rollouts (4 groups of 4), their routing replaced by the routing the
    recipe's model (same flags, same seed) chooses natively at its initial weights: what an
    engine serving those weights returns, so replay must agree with 100% of the blocks."""
    import numpy as np
    import torch

    from replay_bridge.shards import ShardReader, ShardWriter
    from replay_recipes import grpo_megatron as G
    from trainer_hooks.megatron import model_geometry, moe_routers
    from trainer_hooks.megatron.cpu_world import megatron_cpu_world

    G.make_demo_shards(scratch, vocab=256)
    samples = list(ShardReader(scratch))
    with megatron_cpu_world(2), torch.no_grad():
        torch.manual_seed(0)
        model = G.build_model(G.parse_args(["--routing-replay"]), torch.device("cpu"))
        geo = model_geometry(model.config)
        routers = {r.layer: r.module for r in moe_routers(model)}
        maps: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(
            lambda mod, inp, out, layer=layer: maps.__setitem__(layer, out[1].detach()))
            for layer, m in routers.items()]
        with ShardWriter(uri, geo) as w:
            for s in samples:
                n = s.num_tokens
                causal = ~torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
                model(torch.from_numpy(s.tokens.astype(np.int64))[None],
                      torch.arange(n)[None], attention_mask=causal)
                ids = [np.argsort(~maps[layer].numpy(), axis=-1, kind="stable")[:, : geo.top_k]
                       for layer in geo.moe_layers]
                s.routed = np.sort(np.stack(ids, 1), -1)[: n - 1].astype(geo.id_dtype)
                w.add(s)
        for h in hooks:
            h.remove()


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "replay_recipes.grpo_megatron", *args]
    env = child_env() | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "sizes"), [
    ("local", ["--micro-batch-tokens", "64"]),  # THD packs of at most 64 tokens
    ("s3", ["--routing-replay-packing", "bshd", "--routing-replay-seq-length", "32",
            "--micro-batch-samples", "3"]),
], ids=["local-thd", "s3-bshd"])
def test_two_gloo_ranks_train_from_one_dataset_with_replay(request, tmp_path, where, sizes):
    from replay_bridge.layout import Packing
    from replay_bridge.loader import RankLoader
    from replay_bridge.shards import ShardReader

    uri = (str(tmp_path / "dataset") if where == "local"
           else request.getfixturevalue("s3").fresh_uri(label="grpo-ranks"))
    own_routing_dataset(uri, str(tmp_path / "random-routing"))
    log = tmp_path / "log.json"
    proc = _torchrun(["--cpu", "--routing-replay", "--routing-replay-shards", uri, *sizes,
                      "--steps", "3", "--groups-per-step", "2", "--seed", "5",
                      "--log-json", str(log)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(log.read_text())
    assert out["world_size"] == 2 and len(out["steps"]) == 3
    reader = ShardReader(uri)
    groups = {s.sample_id: s.group_id for s in reader}
    # Step 0 runs on the weights that chose the stored routing: 100% agreement on both ranks.
    m0 = out["steps"][0]["metrics"]
    assert m0["routing_replay/exact"] == 1.0 and m0["routing_replay/overlap"] == 1.0, m0
    assert m0["routing_replay/prompt/exact"] == m0["routing_replay/completion/exact"] == 1.0
    steps_groups = []
    for step, rec in enumerate(out["steps"]):
        m, plan, ranks = rec["metrics"], rec["plan"], rec["ranks"]
        assert m["routing_replay/tokens"] > 0 and 0 < m["routing_replay/exact"] <= 1.0
        assert m["loss"] == m["loss"]
        # Each rank read exactly its planned ids; groups whole and on one rank.
        where_: dict[str, set[int]] = defaultdict(set)
        for r in range(2):
            planned = [i for mb in plan["ranks"][r]["micro_batches"] for i in mb]
            assert ranks[r]["read"] == planned and planned
            for i in planned:
                where_[groups[i]].add(r)
        assert len(where_) == 2 and all(len(r) == 1 for r in where_.values())
        read = sorted(ranks[0]["read"] + ranks[1]["read"])
        assert read == sorted(i for i, g in groups.items() if g in where_)  # whole groups
        # Gradients averaged over the ranks: both hold the same weights after every step.
        assert ranks[0]["weights"] == ranks[1]["weights"]
        # A restarted job (any process) plans the same step.
        packing = Packing.thd() if where == "local" else Packing.bshd(32)
        size = dict(max_tokens=64) if where == "local" else dict(micro_batch_size=3)
        again = RankLoader(reader, world_size=2, rank=0, packing=packing, seed=5, step=step,
                           groups_per_step=2, **size)
        assert again.plan.to_dict() == plan
        steps_groups.append(set(where_))
    assert steps_groups[0].isdisjoint(steps_groups[1])  # one epoch: 2 steps of 2 of 4 groups
