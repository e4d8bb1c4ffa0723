"""What the three integration examples share: a tiny megatron-core MoE model on the CPU, the
trainer's packing of a micro-batch, rollout routing made by a perturbed copy of the model's
own routers, and an agreement count that reads the routers' actual choices.

Not part of the bridge: the examples build by hand the tensors each framework holds, feed them
to the bridge's adapters and pick the trainer's packing; this module is the scaffolding around
that: each example's command line (:func:`run_example`) and its replay-off and replay-on passes
with :class:`trainer_hooks.megatron.RoutingReplay` (:func:`replay_result`). The agreement is counted here from the framework's
own tensor and the experts each router actually used (its routing map, read by a forward hook),
never from the bridge's layout or metrics, so a misaligned adapter or layout shows up as
disagreement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from replay_bridge.geometry import RoutingGeometry

VOCAB = 64
NUM_LAYERS = 4
MOE_LAYER_FREQ = [0, 1, 1, 1]  # a dense first layer, as DeepSeek / GLM models have
NUM_EXPERTS = 8
TOP_K = 2
GEOMETRY = RoutingGeometry(NUM_LAYERS, (1, 2, 3), TOP_K, NUM_EXPERTS)
"""The tiny model's routing geometry: 4 layers, MoE at 1-3, 8 experts, top-2."""

# megatron-core warns at import about what a CPU machine lacks (Transformer Engine, Apex).
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

# Router token kinds, per position of the trainer's micro-batch.
REPLAYED, NATIVE, IGNORED = 0, 1, 2


def parse_args(description: str, packings: Sequence[str] = ("thd",),
               extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--no-replay", action="store_true",
                   help="only the pass with replay off (native routing)")
    p.add_argument("--packing", choices=list(packings), default=packings[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    for name, kw in extra:
        p.add_argument(name, **kw)
    return p.parse_args()


@contextlib.contextmanager
def cpu_world(threads: int = 2) -> Iterator[None]:
    """A one-process megatron world on the CPU (gloo, parallel state, CPU shims)."""
    from trainer_hooks.megatron.cpu_world import megatron_cpu_world

    with megatron_cpu_world(threads):
        yield


def build_model(seed: int = 0) -> Any:
    """A 4-layer GPTModel (dense layer 0, MoE layers 1-3, 8 experts, top-2), fp32, built with
    ``moe_enable_routing_replay=True`` so that its routers carry megatron-core RouterReplay
    objects; replay off, they route natively."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4, ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=TOP_K, moe_layer_freq=MOE_LAYER_FREQ,
        moe_enable_routing_replay=True, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=512, position_embedding_type="rope")


# ---- the trainer's micro-batch --------------------------------------------------------------


@dataclass
class TrainerBatch:
    """One micro-batch as the trainer feeds it to the model, and where each sequence's tokens
    sit on the routers' token axis.

    ``rows[i]`` are the router token indices of sequence ``i``'s positions ``0..n_i-1``.
    ``bshd``: one row per sequence, right-padded to ``seq_length`` (router token ``s * b +
    b_idx``). ``thd``: sequences packed one after another, each padded to ``pad_multiple``,
    the pack padded to ``pad_total_multiple`` (router token = packed position). THD runs as
    one row with a block-diagonal causal mask: megatron-core's local attention has no THD
    kernel, and the routers see the same token order as with ``cu_seqlens``.
    """

    inputs: dict[str, torch.Tensor]
    rows: list[np.ndarray]
    num_tokens: int
    packing: str


def trainer_batch(sequences: Sequence[np.ndarray], packing: str, *, seq_length: int = 0,
                  pad_multiple: int = 1, pad_total_multiple: int = 1) -> TrainerBatch:
    lengths = np.asarray([len(s) for s in sequences])
    if packing == "bshd":
        b, s_len = len(sequences), seq_length
        tok = np.zeros((b, s_len), np.int64)
        for i, s in enumerate(sequences):
            tok[i, : len(s)] = s
        mask = torch.triu(torch.ones(s_len, s_len, dtype=torch.bool), 1)[None, None]
        inputs = {"tokens": torch.from_numpy(tok), "attention_mask": mask,
                  "position_ids": torch.arange(s_len).expand(b, s_len)}
        rows = [np.arange(n) * b + i for i, n in enumerate(lengths)]
        return TrainerBatch(inputs, rows, b * s_len, packing)
    padded = -(-lengths // pad_multiple) * pad_multiple
    padded[-1] += -int(padded.sum()) % pad_total_multiple
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    total = int(padded.sum())
    tok = np.zeros(total, np.int64)
    for st, s in zip(starts, sequences):
        tok[st : st + len(s)] = s
    seq = np.repeat(np.arange(len(sequences)), padded)
    pos = np.arange(total) - starts[seq]
    same = seq[:, None] == seq[None, :]
    causal = np.arange(total)[:, None] >= np.arange(total)[None, :]
    inputs = {"tokens": torch.from_numpy(tok)[None],
              "position_ids": torch.from_numpy(pos)[None],
              "attention_mask": torch.from_numpy(~(same & causal))[None, None]}
    rows = [st + np.arange(n) for st, n in zip(starts, lengths)]
    return TrainerBatch(inputs, rows, total, packing)


# ---- what the routers did -------------------------------------------------------------------


class RouterProbe:
    """Forward hooks on every MoE router: per call, the experts actually used (the routing
    map) and the router's own top-k of the scores it computed (``gating`` of its input, in
    score order), both ``[tokens, ...]`` in the router's token order."""

    def __init__(self, model: Any) -> None:
        from trainer_hooks.megatron import moe_routers

        self.routers = moe_routers(model)
        self.used: dict[int, list[np.ndarray]] = {}
        self.own: dict[int, list[np.ndarray]] = {}
        self._handles = [r.module.register_forward_hook(self._hook(r.layer))
                         for r in self.routers]

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            with torch.no_grad():
                logits = module.gating(inputs[0].detach()).view(-1, module.config.num_moe_experts)
                own = torch.topk(logits, module.topk, dim=1).indices
            self.used.setdefault(layer, []).append(output[1].detach().cpu().numpy())
            self.own.setdefault(layer, []).append(own.cpu().numpy())
        return hook

    def last(self) -> tuple[np.ndarray, np.ndarray]:
        """The last call of each router: used ``bool [tokens, moe_layers, experts]`` and own
        top-k ``int [tokens, moe_layers, k]``."""
        layers = sorted(self.used)
        return (np.stack([self.used[l][-1] for l in layers], axis=1),
                np.stack([self.own[l][-1] for l in layers], axis=1))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def forward_pass(model: Any, batch: TrainerBatch, replay: Any = None,
                 routing: Any = None) -> None:
    """One training pass (forward and backward) through megatron's schedule, with the replay
    wrapping the forward step and ``replaying`` the micro-batch when given."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from trainer_hooks.megatron.steps import make_forward_step

    step = make_forward_step()
    if replay is not None:
        step = replay.wrap_forward_step(step)
    scope = (replay.replaying([routing]) if replay is not None
             else contextlib.nullcontext())
    tok = batch.inputs["tokens"]
    with scope:
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch.inputs]), model=[model],
            num_microbatches=1, seq_length=tok.shape[1], micro_batch_size=tok.shape[0],
            forward_only=False)
    model.zero_grad(set_to_none=True)


def rollout_routing(model: Any, sequences: Sequence[np.ndarray], *, noise: float = 0.1,
                    seed: int = 1) -> list[np.ndarray]:
    """What an inference engine would return for each sequence: the top-k (score order) of a
    copy of the model whose router weights carry noise (the engine's numerics differ from the
    trainer's), for every hidden layer, ``int64 [len(seq), num_layers, k]``; dense layers hold
    zeros. The trainer's own routers disagree with it on part of the tokens."""
    from trainer_hooks.megatron import moe_routers

    gen = torch.Generator().manual_seed(seed)
    weights = [r.module.weight for r in moe_routers(model)]
    saved = [w.detach().clone() for w in weights]
    batch = trainer_batch(sequences, "thd")
    probe = RouterProbe(model)
    try:
        with torch.no_grad():
            for w in weights:
                w.add_(noise * w.std() * torch.randn(w.shape, generator=gen))
            i = batch.inputs
            model(i["tokens"], i["position_ids"], i["attention_mask"])
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
        probe.close()
    _, own = probe.last()
    out = []
    for rows in batch.rows:
        full = np.zeros((len(rows), NUM_LAYERS, TOP_K), np.int64)
        full[:, list(GEOMETRY.moe_layers)] = own[rows]
        out.append(full)
    return out


# ---- agreement ------------------------------------------------------------------------------


@dataclass
class Expected:
    """Per router token: its kind (:data:`REPLAYED`, :data:`NATIVE`, :data:`IGNORED`) and, for
    replayed tokens, the rollout's ids ``[tokens, moe_layers, k]`` read from the framework's
    tensor."""

    kind: np.ndarray
    ids: np.ndarray
    regions: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, tokens: int) -> Expected:
        return cls(np.full(tokens, IGNORED, np.int8),
                   np.zeros((tokens, GEOMETRY.num_moe_layers, TOP_K), np.int64))


def agreement(probe: RouterProbe, expected: Expected) -> dict[str, Any]:
    """Blocks (token, MoE layer) whose used experts equal the rollout's (replayed tokens) or
    the router's own top-k (native tokens)."""
    used, own = probe.last()
    if used.shape[0] != expected.kind.shape[0]:
        raise RuntimeError(f"routers saw {used.shape[0]} tokens, expected "
                           f"{expected.kind.shape[0]}")
    used_ids = np.sort(np.argsort(~used, axis=-1, kind="stable")[..., :TOP_K], axis=-1)
    want = np.sort(expected.ids, axis=-1)

    def figures(sel: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        blocks = int(sel.sum()) * GEOMETRY.num_moe_layers
        if not blocks:
            return {"tokens": 0, "blocks": 0, "exact": None, "overlap": None}
        got, ref = used_ids[sel], target[sel]
        exact = (got == ref).all(-1)
        hits = (got[..., :, None] == ref[..., None, :]).any(-1).sum(-1)
        return {"tokens": int(sel.sum()), "blocks": blocks,
                "exact": float(exact.mean()), "overlap": float(hits.mean() / TOP_K)}

    replayed = expected.kind == REPLAYED
    out = figures(replayed, want)
    for name, sel in expected.regions.items():
        out[name] = figures(replayed & sel, want)
    out["native"] = figures(expected.kind == NATIVE, np.sort(own, axis=-1))
    return out


def run_passes(model: Any, batch: TrainerBatch, expected: Expected, replay_factory: Any,
               samples: Sequence[Any], no_replay: bool) -> dict[str, Any]:
    """The training pass with replay off, then (unless ``no_replay``) with replay on, on the
    same weights; the agreement of each, and the bridge's own metrics of the replayed pass."""
    out: dict[str, Any] = {}
    probe = RouterProbe(model)
    try:
        forward_pass(model, batch)
        out["replay_off"] = agreement(probe, expected)
        if not no_replay:
            replay = replay_factory()
            try:
                routing = replay.prepare(samples)
                forward_pass(model, batch, replay, routing)
                out["replay_on"] = agreement(probe, expected)
                metrics = replay.metrics()
                out["bridge_metrics"] = {k: v for k, v in metrics.items() if "layer" not in k}
            finally:
                replay.close()
    finally:
        probe.close()
    return out


def replay_result(framework: str, layout: str, model: Any, batch: TrainerBatch, packing: Any,
                  expected: Expected, adapted: Any, no_replay: bool,
                  **extra: Any) -> dict[str, Any]:
    """An example's result: the framework and the layout of its tensors, the trainer's packing,
    how many samples the bridge's adapter (``adapted``) accepted, ``extra`` fields, and
    :func:`run_passes` of the accepted samples with a
    :class:`~trainer_hooks.megatron.RoutingReplay` over ``packing`` (a ``Packing``)."""
    from trainer_hooks.megatron import RoutingReplay

    return {
        "framework": framework, "layout": layout, "packing": batch.packing,
        "samples": len(adapted.reports), "accepted": len(adapted.accepted), **extra,
        **run_passes(model, batch, expected,
                     lambda: RoutingReplay(model, GEOMETRY, packing=packing),
                     adapted.accepted, no_replay),
    }


def run_example(example: Callable[[argparse.Namespace, Any], dict[str, Any]], description: str,
                packings: Sequence[str] = ("thd",),
                extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
    """An example's command line: its arguments (:func:`parse_args`), then ``example(args,
    model)`` in a CPU world (:func:`cpu_world`) over the tiny model (:func:`build_model`), and
    its result printed (:func:`report`)."""
    args = parse_args(description, packings, extra)
    with cpu_world(args.threads):
        result = example(args, build_model(args.seed))
    report(result, args.json)


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return
    print(f"{result['framework']}: {result['layout']}")
    print(f"  adapter: {result['accepted']} of {result['samples']} samples accepted"
          + (f", {result['native_rows']} native rows" if result.get("native_rows") else ""))
    for name in ("replay_off", "replay_on"):
        if name not in result:
            continue
        r = result[name]
        line = (f"  {name:10s} {r['tokens']} replayed tokens x {GEOMETRY.num_moe_layers} MoE "
                f"layers: exact {r['exact']:.2%}, overlap {r['overlap']:.2%}")
        if r["native"]["tokens"]:
            line += (f"; {r['native']['tokens']} native tokens: own top-k "
                     f"{r['native']['exact']:.2%}")
        print(line)
