"""A GRPO-style policy-gradient step on a megatron-core GPTModel with rollout routing replay.

What an RL trainer does with the bridge, end to end, in one file:

1. open the rollout dataset (``--routing-replay-shards``: a directory or any dataset URI,
   ``s3://bucket/prefix`` included) and build the replay over the model (every guard runs
   there: geometry, fused router, capacity, router count, leftovers);
2. per step, the rank loader (``replay_bridge.loader.RankLoader``) gives this data-parallel
   rank its share of the step: whole GRPO groups, token-balanced across ranks, the same for a
   ``--seed`` and step on every rank and every restart, read from the dataset without
   reading the other ranks' samples; cut into micro-batches (``--micro-batch-samples``, or a
   THD token budget ``--micro-batch-tokens``); each micro-batch's routing is laid out for
   this rank's routers (``replay.prepare``);
3. a log-prob pass (forward only) and a training pass, both through Megatron's schedule with
   the replay-wrapped forward step, each inside ``replay.replaying(...)``; gradients averaged
   over the data-parallel ranks;
4. log ``replay.metrics()`` summed over the data-parallel ranks: agreement between the
   routers' own top-k and the replayed top-k, per layer and by prompt / completion region.

On a CPU (tiny model, synthetic shards written first)::

    python -m replay_recipes.grpo_megatron --cpu --make-demo-shards out/demo-shards \\
        --routing-replay --routing-replay-shards out/demo-shards --steps 2

Across data-parallel ranks (gloo on CPUs here; NCCL without ``--cpu``)::

    torchrun --nproc-per-node 2 -m replay_recipes.grpo_megatron --cpu \\
        --routing-replay --routing-replay-shards s3://bucket/rollouts --steps 2

Or from a trainer config (``configs/trainer/``): its ``model:`` and ``train:`` keys are this
script's flags of the same name, its ``routing_replay:`` section the ``--routing-replay*`` flags;
flags given on the command line win. Every key of a config is read: an unknown section or key is
an error (:func:`load_trainer_config`).

With replay off (``--routing-replay`` absent) the same script trains with native routing.
The reward here is a toy (fraction of completion tokens below ``vocab / 2``); bring your own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.loader import MicroBatch, RankLoader
from replay_bridge.sample import RoutedSample
from replay_recipes.grpo import group_advantages, policy_loss, rewards, token_logprobs
from trainer_hooks.megatron import (
    add_routing_replay_args,
    args_from_options,
    build_routing_replay,
    options_from_args,
    options_from_config,
)
from trainer_hooks.megatron.steps import make_forward_step

MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_experts",
              "moe_router_topk", "vocab_size")
TRAIN_KEYS = ("steps", "groups_per_step", "micro_batch_samples", "micro_batch_tokens", "seed",
              "lr", "clip", "recompute")
SECTIONS = {"model": MODEL_KEYS, "train": TRAIN_KEYS, "routing_replay": None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    m = p.add_argument_group("model (config section model:)")
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--num-experts", type=int, default=8)
    m.add_argument("--moe-router-topk", type=int, default=2)
    m.add_argument("--vocab-size", type=int, default=256)
    t = p.add_argument_group("training (config section train:)")
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--groups-per-step", type=int, default=2,
                   help="GRPO groups a step takes, over all data-parallel ranks")
    t.add_argument("--micro-batch-samples", type=int, default=2)
    t.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="THD: a token budget per micro-batch instead of a sample count (0: off)")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the step plan (which samples, which rank, in which order)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--clip", type=float, default=0.2)
    t.add_argument("--recompute", action="store_true", help="full activation recompute")
    p.add_argument("--config", default=None,
                   help="YAML trainer config (model:, train:, routing_replay:); flags win")
    p.add_argument("--cpu", action="store_true", help="run on CPUs (test shims applied)")
    p.add_argument("--make-demo-shards", metavar="URI", default=None,
                   help="first write synthetic rollout shards (tiny-qwen3-moe geometry) to URI")
    p.add_argument("--log-json", metavar="FILE", default=None,
                   help="write each step's metrics, plan and the ids every rank read (JSON)")
    add_routing_replay_args(p)
    return p


def load_trainer_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A trainer config as this script's argument defaults, by argument name. Strict: a section
    other than ``model:`` / ``train:`` / ``routing_replay:``, or a key that no flag reads, is a
    ``ValueError`` naming it and the known ones."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a trainer config must be a mapping")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    actions = {a.dest: a for a in _parser()._actions}
    defaults: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if keys is None or data.get(section) is None:
            continue
        values = data[section]
        if not isinstance(values, Mapping):
            raise ValueError(f"{path}: section {section}: must be a mapping")
        bad = sorted(set(values) - set(keys))
        if bad:
            raise ValueError(f"{path}: unknown {section} key(s) {bad}; known: {list(keys)}")
        for key, value in values.items():
            defaults[key] = _typed(actions[key], value, f"{path}: {section}.{key}")
    if "routing_replay" in data:
        defaults.update(args_from_options(options_from_config(data)))
    return defaults


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` as the flag ``action`` would parse it (a switch takes a YAML boolean)."""
    if action.type is None:  # a store_true switch
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    whole = action.type is not int or isinstance(value, int)  # no silent 2.5 -> 2
    try:
        if whole and not isinstance(value, bool):
            return action.type(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{where} must be a {action.type.__name__}, got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over the ``--config`` file's values over the built-in defaults."""
    p = _parser()
    config = p.parse_known_args(argv)[0].config
    if config:
        p.set_defaults(**load_trainer_config(config))
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.transformer_config import TransformerConfig

    # megatron-core keeps every RouterReplay in one process-wide list, which would keep a model
    # built earlier in this process alive; the replay itself never reads the list.
    RouterReplay.clear_global_router_replay_instances()
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk, moe_token_dispatcher_type="alltoall",
        moe_enable_routing_replay=args.routing_replay,  # replay needs RouterReplay objects
        moe_aux_loss_coeff=0.0, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        **(dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=1) if args.recompute else {}),
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                     max_sequence_length=4096, position_embedding_type="rope")
    return model.to(device)


def micro_batch_inputs(mb: MicroBatch, advantages: dict[str, float],
                       device: torch.device) -> dict:
    """Tokens, positions, attention mask, advantages and loss mask of one loader micro-batch.
    THD packing is one row with a block-diagonal causal mask (megatron-core's local attention
    has no THD kernel; with Transformer Engine pass ``packed_seq_params`` from
    ``mb.cu_seqlens`` / ``mb.cu_seqlens_padded`` instead): the routers see the same token
    order. Position ``t`` predicts token ``t + 1``, so the loss and the advantages sit on
    ``mb.label_mask``. The step's "old" log-probs come from its own log-prob pass."""
    tokens, pos, label = mb.tokens, mb.position_ids, mb.label_mask
    if mb.packing.format == "thd":
        tokens, pos, label = tokens[None], pos[None], label[None]
    width = tokens.shape[1]
    adv = np.asarray([advantages[i] for i in mb.sample_ids], np.float32)
    padded = np.diff(mb.cu_seqlens_padded)
    if mb.packing.format == "bshd":
        adv_w = np.where(label, adv[:, None], 0.0).astype(np.float32)
        mask = ~np.tril(np.ones((width, width), bool))[None]
    else:
        seq = np.repeat(np.arange(len(padded)), padded)
        adv_w = np.where(label, adv[seq][None], 0.0).astype(np.float32)
        same = seq[:, None] == seq[None, :]
        mask = ~(same & np.tril(np.ones((width, width), bool)))[None]
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    return dict(tokens=t(tokens), position_ids=t(pos), attention_mask=t(mask[:, None]),
                adv=t(adv_w), loss_mask=t(label))


def grpo_advantages(samples: list[RoutedSample], vocab: int) -> dict[str, float]:
    """Toy reward (fraction of completion tokens below ``vocab / 2``), group-normalised
    advantage (GRPO), by sample id."""
    reward = rewards(samples, np.arange(vocab) < vocab // 2)
    adv = group_advantages(reward, [s.group_id or s.sample_id for s in samples])
    return {s.sample_id: float(a) for s, a in zip(samples, adv)}


def grpo_loss(clip: float, batch: dict[str, Any], logits: torch.Tensor) -> tuple[Any, dict]:
    """Megatron's ``loss_func`` for one micro-batch. Log-prob pass (no ``old_lp`` yet): keep the
    log-probs in the batch and return a zero loss. Training pass: the PPO-clip loss against
    ``old_lp``, averaged over the micro-batch's completion tokens."""
    lp = torch.nn.functional.pad(token_logprobs(logits, batch["tokens"][:, 1:]), (0, 1))
    if "old_lp" not in batch:
        batch["out_lp"] = lp.detach()
        return lp.sum() * 0, {}
    mask = batch["loss_mask"]
    pl = policy_loss(lp, batch["old_lp"], batch["adv"], mask, clip)
    loss = pl.loss / mask.sum().clamp(min=1)
    return loss, {"loss": loss.detach()}


def make_demo_shards(path: str, vocab: int, seed: int = 0) -> None:
    """Synthetic rollouts (4 groups of 4) in the tiny-qwen3-moe geometry."""
    from replay_bridge.shards import ShardWriter

    geo = RoutingGeometry.from_preset("tiny-qwen3-moe")
    rng = np.random.default_rng(seed)
    with ShardWriter(path, geo) as w:
        for g in range(4):
            prompt = rng.integers(0, vocab, int(rng.integers(6, 12))).astype(np.int32)
            for j in range(4):
                comp = rng.integers(0, vocab, int(rng.integers(4, 16))).astype(np.int32)
                tokens = np.concatenate([prompt, comp])
                keys = rng.random((len(tokens) - 1, geo.num_moe_layers, geo.num_experts))
                w.add(RoutedSample(
                    sample_id=f"g{g}-{j}", group_id=f"g{g}", tokens=tokens,
                    prompt_len=len(prompt), policy_version=0,
                    logprobs=rng.normal(-2.0, 0.5, len(comp)).astype(np.float32),
                    routed=np.argsort(keys, -1)[..., : geo.top_k].astype(geo.id_dtype)))


def _average_gradients(model: torch.nn.Module, group: Any, world: int) -> None:
    """Average every parameter's gradient over the data-parallel ranks, in one flat all-reduce
    (a parameter no token reached on a rank counts as a zero gradient there)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from trainer_hooks.megatron import cpu_compat

    if args.cpu:
        cpu_compat.apply()  # test shims: megatron-core 0.16 on a CPU-only torch
        device, backend = torch.device("cpu"), "gloo"
    else:
        cpu_compat.apply_te_gemm_fix()  # megatron-core 0.16.x without Transformer Engine
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
        torch.cuda.set_device(device)
    owns_world = not dist.is_initialized()
    if owns_world:
        if "WORLD_SIZE" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:  # a single process: in-process store, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    owns_parallel_state = not ps.model_parallel_is_initialized()
    if owns_parallel_state:
        ps.initialize_model_parallel()
    try:
        metrics = _train(args, device)
        if owns_world:  # every rank done before any tears down (not after an error: the
            dist.barrier()  # others may never arrive, and must fail rather than wait)
        return metrics
    finally:  # what this call set up: a process group left to the interpreter's exit can
        # abort in its threads' destructors
        if owns_parallel_state:
            ps.destroy_model_parallel()
        if owns_world:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The recipe's steps in an initialised world and parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = dist.get_rank() == 0
    if args.make_demo_shards:
        if first:
            make_demo_shards(args.make_demo_shards, args.vocab_size)
        dist.barrier()

    options = options_from_args(args)
    torch.manual_seed(0)  # the same initial weights on every rank
    if device.type == "cuda":  # megatron-core's attention forks the CUDA RNG tracker
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    model = build_model(args, device)

    from replay_bridge.shards import ShardReader

    reader = ShardReader(options.shards or args.make_demo_shards)
    replay = build_routing_replay(options, model, source=reader)  # None when replay is off
    from trainer_hooks.megatron import Packing

    packing = replay.packing if replay is not None else Packing.thd()
    dp_group = ps.get_data_parallel_group()
    dp_world, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # Routing is laid out by replay.prepare for this rank's routers, so the loader skips it.
    loader = RankLoader(
        reader, world_size=dp_world, rank=dp_rank, packing=packing, seed=args.seed,
        groups_per_step=args.groups_per_step, routing=False,
        **(dict(max_tokens=args.micro_batch_tokens) if args.micro_batch_tokens
           else dict(micro_batch_size=args.micro_batch_samples)))

    forward_step = make_forward_step(functools.partial(grpo_loss, args.clip))
    fwd = replay.wrap_forward_step(forward_step) if replay is not None else forward_step
    fb = get_forward_backward_func()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    metrics: dict[str, float] = {}
    log: list[dict[str, Any]] = []
    for step in range(args.steps):
        step_loader = loader.for_step(step)
        mbs = list(step_loader)  # reads this rank's samples only
        samples = [s for mb in mbs for s in mb.samples]
        adv = grpo_advantages(samples, args.vocab_size)  # groups are whole on one rank
        batches = [micro_batch_inputs(mb, adv, device) for mb in mbs]
        routing = [replay.prepare(mb.samples) for mb in mbs] if replay is not None else None
        seq_len = max(b["tokens"].shape[1] for b in batches)

        def run(forward_only: bool, data: list[dict]) -> list[Any]:
            # Agreement is measured in the training pass only.
            scope = (replay.replaying(routing, forward_only=forward_only,
                                      measure=not forward_only)
                     if replay is not None else contextlib.nullcontext())
            with scope:
                return fb(forward_step_func=fwd, data_iterator=iter(data), model=[model],
                          num_microbatches=len(data), seq_length=seq_len,
                          micro_batch_size=data[0]["tokens"].shape[0], forward_only=forward_only)

        # 1. Log-probs of the current policy (the "old" policy of this step), replayed.
        lp_batches = [dict(b) for b in batches]
        with torch.no_grad():
            run(True, lp_batches)
        for b, lb in zip(batches, lp_batches):
            b["old_lp"] = lb["out_lp"]
        # 2. Training pass, replayed; gradients averaged over the ranks; the optimizer step.
        opt.zero_grad(set_to_none=True)
        losses = run(False, batches)
        if dp_world > 1:
            _average_gradients(model, dp_group, dp_world)
        opt.step()
        loss = torch.tensor([np.mean([l["loss"].item() for l in losses])], device=device)
        if dp_world > 1:
            dist.all_reduce(loss, group=dp_group)
            loss /= dp_world
        metrics = {"step": float(step), "loss": float(loss.item())}
        if replay is not None:
            metrics.update(replay.metrics(group=dp_group if dp_world > 1 else None))
        if first:
            print({k: round(v, 4) for k, v in metrics.items() if "layer" not in k}, flush=True)
        if args.log_json:  # what each rank read, and a checksum of its weights after the step
            mine = {"read": step_loader.sample_ids,
                    "weights": float(sum(p.detach().double().sum() for p in model.parameters()))}
            ranks: list[Any] = [mine]
            if dp_world > 1:
                ranks = [None] * dp_world
                dist.all_gather_object(ranks, mine, group=dp_group)
            log.append({"metrics": metrics, "plan": step_loader.plan.to_dict(), "ranks": ranks})
    if args.log_json and first:
        Path(args.log_json).write_text(json.dumps(
            {"world_size": dp_world, "steps": log}, indent=1, allow_nan=True))
    if replay is not None:
        replay.close()
    return metrics


if __name__ == "__main__":
    main()
