"""Two ranks train a tiny ``transformers`` MoE model under FSDP2 (``fully_shard`` on every
decoder layer and the root) with routing replay on; run by torchrun::

    python -m torch.distributed.run --nproc-per-node 2 -m tests.trainer_hooks.hf.fsdp2_ranks \\
        --out fsdp2.json [--device cuda] [--families qwen3_moe deepseek_v3]

gloo on CPU, NCCL with ``--device cuda`` (one GPU per rank). Per family, every rank lays out
its own micro-batches (one padded, rank 0 on the right and rank 1 on the left; one packed with
padding at the end; each with a late ``routed_start`` and rows marked native) and runs two
optimizer steps (SGD) with gradient accumulation over them: step 1 plain, step 2 with
gradient checkpointing (``model.activation_checkpointing_enable()``, formerly
``gradient_checkpointing_enable()``, non-reentrant), applied after ``fully_shard``.

What is checked, independently of the hook's code (forward pre-hooks on each MoE block's
``experts`` module, ``support.ExpertsCapture``, against the stored ids one sample at a time):

- every call of every experts module (the forward and, in step 2, the recompute) receives the
  stored ids on 100.000% of data rows, and the router's own routing (ids and weights bit for
  bit) on pad and native rows;
- agreement summed over the group (``replay.metrics(group=WORLD)``) counts both ranks' rows;
- every router weight has a gradient (all-gathered);
- after each step the all-gathered parameters equal those of an unsharded copy of the model
  that ran both ranks' micro-batches with replay in one process (SGD on the mean of the two
  ranks' losses: what FSDP2's averaged reduce-scatter computes), and are the same bytes on
  both ranks;
- with replay off the same comparison disagrees (so it can fail).

Rank 0 writes every rank's figures to ``--out`` (JSON) and prints one line per family and
step. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tests.trainer_hooks.hf import support as S
from trainer_hooks.hf import NATIVE, PAD, RoutingReplay, model_geometry

SEQ = 14
LR = 0.5


def _samples(geometry, rank: int) -> dict[str, list]:
    """Each rank's samples (every rank can rebuild every rank's, for the reference): a padded
    micro-batch and a packed one, each with a late routed_start and native rows."""
    padded = S.make_samples(geometry, [9, 14, 6] if rank == 0 else [12, 7, 11], seed=10 + rank,
                            prefix=f"r{rank}p", routed_start=[0, 3], native={2: [1, 4]})
    packed = S.make_samples(geometry, [8, 11, 6] if rank == 0 else [10, 5, 9], seed=20 + rank,
                            prefix=f"r{rank}k", routed_start=[2], native={1: [0, 3]})
    return {"padded": padded, "packed": packed}


def _batch(samples, layout: str, side: str) -> tuple[dict[str, torch.Tensor], list]:
    """Model inputs and each sample's (first flat grid row, length)."""
    if layout == "packed":
        batch = S.packed_batch(samples, pad=3)
        starts = np.concatenate(([0], np.cumsum([s.num_tokens for s in samples])[:-1]))
        return batch, [(int(a), s.num_tokens) for a, s in zip(starts, samples)]
    batch = S.padded_batch(samples, SEQ, side)
    spans = [(i * SEQ + (0 if side == "right" else SEQ - s.num_tokens), s.num_tokens)
             for i, s in enumerate(samples)]
    return batch, spans


def _micro_batches(geometry, rank: int) -> list[tuple[str, list, dict, list]]:
    s = _samples(geometry, rank)
    side = "right" if rank == 0 else "left"
    out = []
    for layout in ("padded", "packed"):
        batch, spans = _batch(s[layout], layout, side)
        out.append((layout, s[layout], batch, spans))
    return out


def _prepare(replay: RoutingReplay, layout: str, samples, batch, device):
    if layout == "packed":
        mb = replay.prepare(samples, position_ids=batch["position_ids"],
                            attention_mask=batch.get("attention_mask"), packing="packed")
    else:
        mb = replay.prepare(samples, attention_mask=batch["attention_mask"])
    return mb, {k: v.to(device) for k, v in batch.items()}


def _loss(model, batch) -> torch.Tensor:
    return model(**batch).logits.float().pow(2).mean()


def _check_calls(cap: S.ExpertsCapture, geometry, samples, spans, mb, calls: int) -> dict:
    """Every call of every experts module against the stored ids (data rows) and the
    router's own routing (pad and native rows)."""
    total = mb.host.region.size
    region = mb.host.region
    own_rows = torch.from_numpy((region == PAD) | (region == NATIVE))
    data_equal = data_rows = own_equal = own_rows_n = 0
    n_calls = set()
    for j, layer in enumerate(geometry.moe_layers):
        want, has = S.expected_rows(samples, spans, total, j)
        n_calls.add(len(cap.calls[layer]))
        for c in cap.calls[layer]:
            got = c["ids"].cpu().numpy()
            data_equal += int((got[has] == want[has]).all(-1).sum())
            data_rows += int(has.sum())
            own = own_rows.to(c["ids"].device)
            same = ((c["ids"][own] == c["own_ids"][own]).all(-1)
                    & (c["weights"][own] == c["own_weights"][own]).all(-1))
            own_equal += int(same.sum())
            own_rows_n += int(own.sum())
    assert n_calls == {calls}, f"experts called {n_calls} times per layer, expected {calls}"
    return {"data_rows": data_rows, "data_rows_equal": data_equal,
            "own_rows": own_rows_n, "own_rows_equal": own_equal,
            "native_rows": int((region == NATIVE).sum()), "calls_per_layer": calls}


def _full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter, all-gathered (a collective: every rank calls it)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters()}


def _digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(params):
        h.update(n.encode())
        h.update(params[n].numpy().tobytes())
    return h.hexdigest()[:16]


def _reference_step(ref, ref_replay, geometry, world: int, device, grad_ckpt: bool) -> None:
    """The unsharded copy runs every rank's micro-batches in this process: SGD on the mean
    over ranks of each rank's summed micro-batch losses."""
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for r in range(world):
        for layout, samples, batch, _ in _micro_batches(geometry, r):
            mb, b = _prepare(ref_replay, layout, samples, batch, device)
            with ref_replay.replaying(mb, measure=False):
                (_loss(ref, b) / world).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_family(family: str, device: torch.device) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = S.build_model(family, seed=0).to(device)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    geometry = model_geometry(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    replay = RoutingReplay(model, geometry)
    ref_replay = RoutingReplay(ref, geometry, agreement=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    prev = {n: p.detach().cpu().clone() for n, p in ref.named_parameters()}
    steps = []
    for step, grad_ckpt in ((1, False), (2, True)):
        t0 = time.perf_counter()
        if grad_ckpt:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:      # transformers >= 5.x's name
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        record: dict[str, Any] = {"step": step, "gradient_checkpointing": grad_ckpt,
                                  "micro_batches": {}}
        for layout, samples, batch, spans in _micro_batches(geometry, rank):
            mb, b = _prepare(replay, layout, samples, batch, device)
            cap = S.ExpertsCapture(model)
            with replay.replaying(mb):
                _loss(model, b).backward()
            cap.close()
            record["micro_batches"][layout] = _check_calls(
                cap, geometry, samples, spans, mb, 2 if grad_ckpt else 1)
        record["metrics"] = replay.metrics(group=dist.group.WORLD)
        grads = {n: p.grad for n, p in model.named_parameters()
                 if n.endswith("mlp.gate.weight")}
        record["router_grad_norms"] = [
            float((g.full_tensor() if hasattr(g, "full_tensor") else g).norm())
            if g is not None else 0.0 for g in grads.values()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        _reference_step(ref, ref_replay, geometry, world, device, grad_ckpt)
        full = _full_params(model)
        ref_p = {n: p.detach().cpu() for n, p in ref.named_parameters()}
        record["max_abs_diff_vs_unsharded"] = max(
            float((full[n] - ref_p[n]).abs().max()) for n in full)
        record["max_param_change"] = max(float((full[n] - prev[n]).abs().max()) for n in full)
        prev = full
        record["params_digest"] = _digest(full)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        steps.append(record)

    # Replay off: the experts get the model's own routing, not the stored ids.
    layout, samples, batch, spans = _micro_batches(geometry, rank)[0]
    mb, b = _prepare(replay, layout, samples, batch, device)
    cap = S.ExpertsCapture(model)
    with torch.no_grad():
        model(**b)
    cap.close()
    total = mb.host.region.size
    off_equal = off_rows = 0
    for j, layer in enumerate(geometry.moe_layers):
        want, has = S.expected_rows(samples, spans, total, j)
        got = cap.calls[layer][0]["ids"].cpu().numpy()
        off_equal += int((got[has] == want[has]).all(-1).sum())
        off_rows += int(has.sum())
    replay.close()
    ref_replay.close()
    return {"family": family, "rank": rank, "steps": steps,
            "replay_off": {"data_rows": off_rows, "data_rows_equal": off_equal}}


def _verdict(per_rank: list[dict]) -> list[str]:
    """Failed checks, as sentences (empty: all held)."""
    bad = []
    fam = per_rank[0]["family"]
    for rec in per_rank:
        r = rec["rank"]
        for st in rec["steps"]:
            for layout, m in st["micro_batches"].items():
                where = f"{fam} rank {r} step {st['step']} {layout}"
                if m["data_rows_equal"] != m["data_rows"] or not m["data_rows"]:
                    bad.append(f"{where}: {m['data_rows_equal']}/{m['data_rows']} data rows")
                if m["own_rows_equal"] != m["own_rows"] or not m["native_rows"]:
                    bad.append(f"{where}: {m['own_rows_equal']}/{m['own_rows']} own rows")
            if not all(g > 0 for g in st["router_grad_norms"]):
                bad.append(f"{fam} rank {r} step {st['step']}: a router without gradient")
            if not st["max_param_change"] > 1e-4:
                bad.append(f"{fam} rank {r} step {st['step']}: the step changed nothing")
            if not st["max_abs_diff_vs_unsharded"] <= 1e-5:
                bad.append(f"{fam} rank {r} step {st['step']}: parameters differ from the "
                           f"unsharded run by {st['max_abs_diff_vs_unsharded']:.3g}")
            if st["metrics"]["routing_replay/tokens"] != sum(
                    m["data_rows"] // m["calls_per_layer"]
                    for x in per_rank
                    for m in x["steps"][st["step"] - 1]["micro_batches"].values()):
                bad.append(f"{fam} step {st['step']}: metrics not summed over the group")
        off = rec["replay_off"]
        if off["data_rows_equal"] >= 0.5 * off["data_rows"]:
            bad.append(f"{fam} rank {r}: replay off agrees on {off['data_rows_equal']}/"
                       f"{off['data_rows']} rows (the test could not fail)")
    for i in range(len(per_rank[0]["steps"])):
        if len({rec["steps"][i]["params_digest"] for rec in per_rank}) != 1:
            bad.append(f"{fam} step {i + 1}: ranks hold different parameters")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--families", nargs="+", default=["qwen3_moe", "deepseek_v3"])
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        # Exact comparisons: no TF32 in the matmuls of either model.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    results, failures = [], []
    for family in args.families:
        rec = run_family(family, device)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rec)
        failures += _verdict(gathered)
        results.append(gathered)
        if rank == 0:
            for st in range(len(rec["steps"])):
                rows = [g["steps"][st] for g in gathered]
                eq = sum(m["data_rows_equal"] for x in rows for m in x["micro_batches"].values())
                n = sum(m["data_rows"] for x in rows for m in x["micro_batches"].values())
                own = sum(m["own_rows_equal"] for x in rows for m in x["micro_batches"].values())
                own_n = sum(m["own_rows"] for x in rows for m in x["micro_batches"].values())
                m = rows[0]["metrics"]
                print(f"{family} step {st + 1} (gc={rows[0]['gradient_checkpointing']}): "
                      f"experts got the stored ids on {eq}/{n} data rows "
                      f"({100 * eq / n:.3f}%) over {world} ranks, own routing on "
                      f"{own}/{own_n} pad+native rows; metrics over the group: "
                      f"tokens {m['routing_replay/tokens']:.0f}, native "
                      f"{m['routing_replay/native/tokens']:.0f}; max |param - unsharded| "
                      f"{max(x['max_abs_diff_vs_unsharded'] for x in rows):.2e}; digests "
                      f"{sorted({x['params_digest'] for x in rows})}", flush=True)
            offs = [g["replay_off"] for g in gathered]
            print(f"{family} replay off: {sum(o['data_rows_equal'] for o in offs)}/"
                  f"{sum(o['data_rows'] for o in offs)} data rows get the stored ids", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "backend": dist.get_backend(),
                       "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                       "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "families": results, "failures": failures}, f, indent=1)
        for line in failures:
            print("FAILED:", line, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
