"""slime (and miles): per-sample rollout routing, replayed in megatron-core by the bridge.

What slime holds after a rollout with ``--use-rollout-routing-replay``: one ``Sample`` per
rollout (``slime/utils/types.py``) whose ``tokens`` are prompt + response and whose
``rollout_routed_experts`` is ``int32 [len(tokens) - 1, num_layers, top_k]``, decoded from
SGLang's ``meta_info.routed_experts`` (every hidden layer; multi-turn answers are appended
from ``routed_experts_start_len`` on). ``slime/ray/rollout.py`` hands the trainer the list of
these arrays as ``rollout_data["rollout_routed_experts"]`` beside ``tokens``,
``response_lengths`` and ``total_lengths``; miles keeps the same field
(``miles/utils/types.py``, NumPy).

This script builds those samples by hand for a tiny megatron-core MoE model (dense layer 0,
MoE layers 1-3), with routing from a perturbed copy of the model's own routers, turns them into
checked samples with ``replay_bridge.from_sample_arrays``, and runs a training pass twice on
the same weights: replay off, then replay on through ``RoutingReplay``. The trainer packs as
slime's ``get_batch`` does (``slime/backends/megatron_utils/data.py``): sequences concatenated
(THD), the pack padded to a multiple of ``tp * --data-pad-size-multiplier`` (128).

    python examples/integrations/slime_example.py [--no-replay] [--json]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import _tiny as T
from replay_bridge import from_sample_arrays
from trainer_hooks.megatron import Packing

DATA_PAD_SIZE_MULTIPLIER = 128  # slime's default; tp = 1 here
PROMPTS, N = 2, 3  # 2 prompts x --n-samples-per-prompt 3


@dataclass
class Sample:
    """The fields of slime's ``Sample`` that routing replay reads."""

    index: int
    group_index: int
    tokens: list[int]
    response_length: int
    rollout_routed_experts: torch.Tensor | None = None


def rollout(rng: np.random.Generator) -> list[Sample]:
    out = []
    for g in range(PROMPTS):
        prompt = rng.integers(1, T.VOCAB, int(rng.integers(4, 12))).tolist()
        for _ in range(N):
            response = rng.integers(1, T.VOCAB, int(rng.integers(3, 14))).tolist()
            out.append(Sample(len(out), g, prompt + response, len(response)))
    return out


def expected(samples: list[Sample], tb: T.TrainerBatch) -> T.Expected:
    """The rollout's ids per router token, read straight from the samples' arrays."""
    e = T.Expected.empty(tb.num_tokens)
    prompt = np.zeros(tb.num_tokens, bool)
    for s, rows in zip(samples, tb.rows):
        mine = s.rollout_routed_experts.numpy()[:, list(T.GEOMETRY.moe_layers)]
        e.kind[rows[:-1]] = T.REPLAYED
        e.ids[rows[:-1]] = mine
        prompt[rows[: len(s.tokens) - s.response_length]] = True
    e.regions = {"prompt": prompt, "completion": ~prompt}
    return e


def example(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """slime's samples for the tiny ``model``, the bridge's adapter over them, slime's THD
    packing, and the replay-off / replay-on result."""
    samples = rollout(np.random.default_rng(args.seed))
    sequences = [np.asarray(s.tokens) for s in samples]
    for s, full in zip(samples, T.rollout_routing(model, sequences, seed=args.seed + 1)):
        # What Sample keeps from SGLang's answer: int32, every layer, len(tokens) - 1 rows.
        s.rollout_routed_experts = torch.from_numpy(full[:-1].astype(np.int32))

    # rollout_data as slime's trainer receives it, and the bridge's adapter over it.
    rollout_data = {
        "tokens": [torch.tensor(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "total_lengths": [len(s.tokens) for s in samples],
        "rollout_routed_experts": [s.rollout_routed_experts for s in samples],
    }
    adapted = from_sample_arrays(
        rollout_data["rollout_routed_experts"], rollout_data["tokens"],
        [t - r for t, r in zip(rollout_data["total_lengths"],
                               rollout_data["response_lengths"])],
        [f"sample-{s.index}" for s in samples], T.GEOMETRY,
        group_ids=[f"group-{s.group_index}" for s in samples])
    adapted.raise_for_rejects()

    tb = T.trainer_batch(sequences, "thd", pad_total_multiple=DATA_PAD_SIZE_MULTIPLIER)
    packing = Packing.thd(pad_total_multiple=DATA_PAD_SIZE_MULTIPLIER)
    layout = (f"{len(samples)} x Sample.rollout_routed_experts int32 "
              f"[len(tokens) - 1, {T.NUM_LAYERS}, {T.TOP_K}]; trainer THD, pack padded "
              f"to {DATA_PAD_SIZE_MULTIPLIER}")
    return T.replay_result("slime", layout, model, tb, packing, expected(samples, tb), adapted,
                           args.no_replay)


if __name__ == "__main__":
    T.run_example(example, __doc__.splitlines()[0])
