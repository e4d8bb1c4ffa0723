"""verl: rollout routing from a verl batch, replayed in megatron-core by the bridge.

What verl holds after a rollout with
``actor_rollout_ref.rollout.enable_rollout_routing_replay=True``
(``verl/experimental/agent_loop/agent_loop.py``, ``_agent_loop_postprocess`` and
``_postprocess``): one ``[batch, prompt_length + response_length]`` row per sample, the
prompt left-padded and the response right-padded, with ``attention_mask`` marking the real
tokens, and ``routed_experts`` ``int16 [batch, seq, num_hidden_layers, top_k]`` aligned to
``input_ids``: the engine's ``len(tokens) - 1`` rows written from the first real prompt token
on, zeros everywhere else (padding, the last token, dense layers).

This script builds exactly that by hand for a tiny megatron-core MoE model (dense layer 0,
MoE layers 1-3), with routing from a perturbed copy of the model's own routers (an engine
whose numerics differ), turns it into checked samples with
``replay_bridge.from_padded_batch``, and runs a training pass twice on the same weights:
replay off, then replay on through ``RoutingReplay``. The trainer packs as verl's Megatron
engine does: padding removed and sequences packed (``--packing thd``), or one right-padded row
per sample (``--packing bshd``).

``--pd merged|decode-only``: the rollout came from prefill/decode-disaggregated workers.
verl's PD path (``SGLangHttpServer.generate``, ``vLLMHttpServer._pd_dispatch``) keeps only
the decode worker's answer, whose prompt rows are not the prompt's routing (decode never ran
the prompt: here they are stale rows of another request, valid ids that no check can catch).
``merged`` joins the prefill worker's prompt rows and the decode worker's completion rows with
``replay_bridge.merge_prefill_decode`` before the batch is built; ``decode-only`` is verl
today.

    python examples/integrations/verl_example.py [--packing thd|bshd] [--pd merged|decode-only]
        [--no-replay] [--json]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

import _tiny as T
from replay_bridge import from_padded_batch, merge_prefill_decode
from replay_bridge.sample import WireSample
from trainer_hooks.megatron import Packing

PROMPT_LENGTH, RESPONSE_LENGTH = 8, 10  # rollout.prompt_length, rollout.response_length
PROMPTS, N = 2, 2  # 2 prompts x rollout.n = 2


def rollouts(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, response ids) per sample: GRPO groups share a prompt."""
    out = []
    for _ in range(PROMPTS):
        prompt = rng.integers(1, T.VOCAB, int(rng.integers(3, PROMPT_LENGTH + 1)))
        for _ in range(N):
            response = rng.integers(1, T.VOCAB, int(rng.integers(2, RESPONSE_LENGTH + 1)))
            out.append((prompt, response))
    return out


def verl_batch(pairs: list[tuple[np.ndarray, np.ndarray]],
               engine_rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The DataProto batch verl's agent loop builds (left-padded prompts, right-padded
    responses, ``routed_experts`` placed from the first real prompt token)."""
    b, s = len(pairs), PROMPT_LENGTH + RESPONSE_LENGTH
    prompts = torch.zeros(b, PROMPT_LENGTH, dtype=torch.int64)
    responses = torch.zeros(b, RESPONSE_LENGTH, dtype=torch.int64)
    p_mask = torch.zeros(b, PROMPT_LENGTH, dtype=torch.int64)
    r_mask = torch.zeros(b, RESPONSE_LENGTH, dtype=torch.int64)
    routed = torch.zeros(b, s, T.NUM_LAYERS, T.TOP_K, dtype=torch.int16)
    for i, ((prompt, response), rows) in enumerate(zip(pairs, engine_rows)):
        start = PROMPT_LENGTH - len(prompt)
        prompts[i, start:] = torch.from_numpy(prompt)
        p_mask[i, start:] = 1
        responses[i, : len(response)] = torch.from_numpy(response)
        r_mask[i, : len(response)] = 1
        routed[i, start : start + len(rows)] = torch.from_numpy(rows.astype(np.int16))
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    return {
        "prompts": prompts, "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "response_mask": r_mask,
        "routed_experts": routed,
    }


def pd_rows(pairs: list[tuple[np.ndarray, np.ndarray]], truth: list[np.ndarray],
            mode: str) -> list[np.ndarray]:
    """Engine rows as a PD rollout returns them: ``merged`` (prefill's prompt rows, decode's
    completion rows, by ``merge_prefill_decode``) or ``decode-only`` (verl today: the decode
    worker's prompt rows are stale rows of another request)."""
    out = []
    for i, ((prompt, response), rows) in enumerate(zip(pairs, truth)):
        tokens = np.concatenate([prompt, response]).astype(np.int32)
        p = len(prompt)
        other = truth[(i + N) % len(truth)]  # a request of another group
        stale = other[np.arange(p) % len(other)]
        decode_rows = np.concatenate([stale, rows[p:]])  # junk prompt rows
        decode = WireSample(sample_id=f"s{i}", tokens=tokens, prompt_len=p,
                            routing=decode_rows.astype(np.int32))
        if mode == "decode-only":
            out.append(decode.routing)
            continue
        # The prefill worker ran the prompt and generated one token: rows for the prompt.
        prefill = WireSample(sample_id=f"s{i}", tokens=tokens[: p + 1], prompt_len=p,
                             routing=rows[:p].astype(np.int32))
        out.append(np.asarray(merge_prefill_decode(prefill, decode).routing))
    return out


def expected(batch: dict[str, torch.Tensor], tb: T.TrainerBatch) -> T.Expected:
    """The rollout's ids per router token, read straight from a verl batch."""
    e = T.Expected.empty(tb.num_tokens)
    prompt = np.zeros(tb.num_tokens, bool)
    mask = batch["attention_mask"].bool().numpy()
    routed = batch["routed_experts"].numpy()
    p_len = mask[:, :PROMPT_LENGTH].sum(1)
    for i, rows in enumerate(tb.rows):
        mine = routed[i][mask[i]][:, list(T.GEOMETRY.moe_layers)]  # [n_i, moe_layers, k]
        t = rows[:-1]  # the last token has no rollout routing
        e.kind[t] = T.REPLAYED
        e.ids[t] = mine[:-1]
        prompt[rows[: p_len[i]]] = True
    e.regions = {"prompt": prompt, "completion": ~prompt}
    return e


def example(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """verl's batch for the tiny ``model`` (``--pd``: from PD workers), the bridge's adapter over
    it, the trainer's ``--packing``, and the replay-off / replay-on result."""
    pairs = rollouts(np.random.default_rng(args.seed))
    sequences = [np.concatenate(p) for p in pairs]
    # Rollout: every hidden layer, len(tokens) - 1 rows per sample (the engine has no
    # routing for the last token it sampled).
    truth = [r[:-1] for r in T.rollout_routing(model, sequences, seed=args.seed + 1)]
    rows = truth if args.pd == "none" else pd_rows(pairs, truth, args.pd)
    batch = verl_batch(pairs, rows)

    # The bridge: verl's batch -> checked samples (same verdicts as the engine path).
    prompt_lengths = batch["attention_mask"][:, :PROMPT_LENGTH].sum(1)
    sample_ids = [f"uid{i // N}-{i % N}" for i in range(len(pairs))]
    adapted = from_padded_batch(
        batch["routed_experts"], batch["attention_mask"], batch["input_ids"],
        prompt_lengths, sample_ids, T.GEOMETRY, group_ids=[f"uid{i // N}" for i in
                                                            range(len(pairs))])
    adapted.raise_for_rejects()

    # The trainer's micro-batch: padding removed (THD), or right-padded rows (bshd).
    real = [s[m] for s, m in zip(batch["input_ids"].numpy(),
                                 batch["attention_mask"].bool().numpy())]
    s_len = PROMPT_LENGTH + RESPONSE_LENGTH
    tb = T.trainer_batch(real, args.packing, seq_length=s_len)
    packing = Packing.thd() if args.packing == "thd" else Packing.bshd(s_len)
    truth_batch = verl_batch(pairs, truth)  # what the engine actually routed
    layout = (f"DataProto routed_experts int16 [{len(pairs)}, {s_len}, "
              f"{T.NUM_LAYERS}, {T.TOP_K}], left/right padded; trainer {args.packing}"
              + ("" if args.pd == "none" else f"; PD {args.pd}"))
    return T.replay_result("verl", layout, model, tb, packing, expected(truth_batch, tb),
                           adapted, args.no_replay, pd=args.pd)


if __name__ == "__main__":
    T.run_example(example, __doc__.splitlines()[0], packings=("thd", "bshd"), extra=[
        ("--pd", dict(choices=["none", "merged", "decode-only"], default="none",
                      help="the rollout came from prefill/decode workers"))])
