"""NeMo-RL: rollout routing with ``-1`` rows (no capture), replayed in megatron-core by the
bridge; the ``-1`` rows route natively.

What NeMo-RL holds after a vLLM rollout with ``policy.router_replay.enabled=true``: the
policy's train data carries ``routed_experts`` ``[batch, seq, layers, top_k]`` right-padded
beside ``input_ids`` and ``input_lengths``, in the narrowest signed dtype that holds the ids
and ``-1`` (``int8`` up to 128 experts; ``nemo_rl/models/generation/interfaces.py``). Row
``t`` is token ``t``'s routing (``pad_and_align_routed_expert_indices`` in
``nemo_rl/models/generation/vllm/utils.py``); a row whose every id is ``-1`` means "no route was
captured" (rows vLLM did not return; messages of a trajectory with no routes at all,
``backfill_missing_routed_experts`` in ``nemo_rl/experience/rollouts.py``) and Megatron routes
it with its own router; the last token and the padding hold the dummy route ``0..k-1``. The
layer axis is vLLM's: here the MoE layers only (NeMo-RL's replay also takes every layer).

This script builds that batch by hand for a tiny megatron-core MoE model (dense layer 0, MoE
layers 1-3): one complete sample, one whose last routes vLLM did not return (``-1`` tail), one
with no routes at all, and turns it into checked samples with
``replay_bridge.from_padded_batch(..., mark=-1)``: an all ``-1`` row becomes a native row (a
partly ``-1`` row would be rejected). A training pass runs twice on the same weights, replay off
and on; the trainer packs as NeMo-RL's sequence packing does (THD, each sequence padded to a
multiple, 4 here). Replayed rows must use the rollout's experts, native rows the router's own
top-k; the two are counted apart.

    python examples/integrations/nemo_rl_example.py [--no-replay] [--json]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

import _tiny as T
from replay_bridge import from_padded_batch
from trainer_hooks.megatron import Packing

PAD_TO_MULTIPLE = 4
MISSING = -1  # nemo_rl ROUTED_EXPERTS_MISSING_ROUTE_SENTINEL
MISSING_TAIL = 3  # routes vLLM did not return at the end of sample 1


def nemo_batch(prompts: list[np.ndarray], responses: list[np.ndarray],
               rollout: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``input_lengths`` and ``routed_experts`` (MoE layers, int8) as the
    policy's train data holds them."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    b, s = len(prompts), max(lengths)
    input_ids = torch.zeros(b, s, dtype=torch.int64)
    dummy = torch.arange(T.TOP_K, dtype=torch.int8)
    routed = dummy.expand(b, s, T.GEOMETRY.num_moe_layers, T.TOP_K).clone()
    for i, (p, r, rows) in enumerate(zip(prompts, responses, rollout)):
        n = lengths[i]
        input_ids[i, :n] = torch.from_numpy(np.concatenate([p, r]))
        moe = torch.from_numpy(rows[:, list(T.GEOMETRY.moe_layers)].astype(np.int8))
        routed[i, : n - 1] = moe  # rows for every token but the last
        if i == 1:  # vLLM returned fewer routes than expected: the tail is -1
            routed[i, n - 1 - MISSING_TAIL : n - 1] = MISSING
        if i == 2:  # no route came back for this trajectory at all
            routed[i, :n] = MISSING  # backfill_missing_routed_experts: every row
    return {"input_ids": input_ids, "input_lengths": torch.tensor(lengths),
            "routed_experts": routed}


def expected(batch: dict[str, torch.Tensor], tb: T.TrainerBatch) -> T.Expected:
    """Per router token, from the NeMo-RL batch: the rollout's ids where a row holds ids,
    native where it is all ``-1``."""
    e = T.Expected.empty(tb.num_tokens)
    routed = batch["routed_experts"].numpy().astype(np.int64)
    for i, rows in enumerate(tb.rows):
        mine = routed[i, : len(rows) - 1]  # the last token's dummy route is not routing
        missing = (mine == MISSING).all(axis=(1, 2))
        e.kind[rows[:-1]] = np.where(missing, T.NATIVE, T.REPLAYED)
        e.ids[rows[:-1]] = np.where(missing[:, None, None], 0, mine)
    return e


def example(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """NeMo-RL's batch for the tiny ``model`` (``-1`` rows included), the bridge's adapter over
    it, NeMo-RL's THD packing, and the replay-off / replay-on result."""
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, T.VOCAB, int(rng.integers(4, 10))) for _ in range(3)]
    responses = [rng.integers(1, T.VOCAB, int(rng.integers(6, 14))) for _ in range(3)]
    sequences = [np.concatenate(pr) for pr in zip(prompts, responses)]
    rollout = [r[:-1] for r in T.rollout_routing(model, sequences, seed=args.seed + 1)]
    batch = nemo_batch(prompts, responses, rollout)

    # The bridge: -1 rows become native rows; every other row is checked as usual.
    lengths = batch["input_lengths"]
    attention_mask = torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]
    adapted = from_padded_batch(
        batch["routed_experts"], attention_mask, batch["input_ids"],
        [len(p) for p in prompts], [f"traj-{i}" for i in range(len(prompts))],
        T.GEOMETRY, mark=MISSING)
    adapted.raise_for_rejects()

    tb = T.trainer_batch(sequences, "thd", pad_multiple=PAD_TO_MULTIPLE)
    packing = Packing.thd(pad_multiple=PAD_TO_MULTIPLE)
    layout = (f"routed_experts int8 [{len(prompts)}, {batch['input_ids'].shape[1]}, "
              f"{T.GEOMETRY.num_moe_layers}, {T.TOP_K}] (MoE layers), right padded, "
              f"-1 rows without a route; trainer THD padded to {PAD_TO_MULTIPLE}")
    return T.replay_result("nemo-rl", layout, model, tb, packing, expected(batch, tb), adapted,
                           args.no_replay,
                           native_rows=int(sum(r.native_rows for r in adapted.reports)))


if __name__ == "__main__":
    T.run_example(example, __doc__.splitlines()[0])
