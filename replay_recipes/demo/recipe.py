"""The demo recipe, step by step (the progress lines count them):

1. the checkpoint: the tiny Qwen3-MoE (made here) or the one given;
2. the engine: the reference engine in PD mode on loopback (bf16), or vLLM;
3. rollouts: N prompts x G samples with routing and log-probs, checked, into shards; the engine
   is shut down once they are in;
4. the shards validated end to end;
5. the same weights in a megatron-core GPTModel (fp32), checked against transformers' logits
   (``train.trainer: hf``: in transformers (fp32), the replay hooks checked inert outside a
   pass);
6. GRPO-style training from the checkpoint with rollout routing replay off,
7. the same with replay on;
8. the figure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replay_bridge.client import CollectSummary
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ValidationReport, validate_dir
from .batches import BatchError, make_micro_batches
from .config import DemoConfig
from ..grpo import group_advantages, rewards, target_tokens
from .trainer import RunResult

__all__ = ["DemoResult", "run_demo"]

Progress = Callable[[str], None]
STEPS = 8
DIRECTION = ("r = logp_trainer - logp_rollout over completion tokens; k3_kl = mean(exp(r) - 1 - r)"
             " estimates KL(rollout || trainer) on tokens the rollout engine sampled")


@dataclass
class DemoResult:
    config: DemoConfig
    model_dir: Path
    geometry: RoutingGeometry
    engine: str
    collect: CollectSummary
    validation: ValidationReport
    max_logit_diff: float
    rewards: np.ndarray
    off: RunResult
    on: RunResult
    plot: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def samples_requested(self) -> int:
        return self.config.collect.prompts * self.config.collect.samples_per_prompt

    @property
    def trainer(self) -> str:
        return self.config.train.trainer

    @property
    def trainer_label(self) -> str:
        return "transformers" if self.trainer == "hf" else "megatron-core"

    @property
    def ok(self) -> bool:
        """Every sample stored, the shards clean, and replay exact."""
        return (self.collect.stored == self.samples_requested and self.validation.ok
                and all(s.routing_used["exact"] == 1.0 for s in self.on.steps))

    def _engine_precision(self) -> str:
        e = self.config.engine
        if e.kind == "reference":
            return e.dtype
        return "bfloat16" if e.start_vllm else "as served by the endpoint"

    def validation_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["region", "tokens", "(token, layer) blocks", "bad blocks", "all-zero blocks"]
        rows = [[region] + [f"{n:,}" for n in counts]
                for region, *counts in self.validation.tally.region_totals()]
        v = self.validation
        rows.append(["samples", f"{v.samples:,}", "", "", ""])
        rows.append(["shards", f"{len(v.manifest.shards)}", "", "", ""])
        rows.append(["quarantined", f"{v.quarantine_records:,}", "", "", ""])
        rows.append(["verdict", "clean" if v.ok else f"{len(v.faults)} faults", "", "", ""])
        return header, rows

    def figures(self) -> dict[str, Any]:
        """Everything measured, as one JSON-ready object (``replay-bridge demo --json``)."""
        off0, on0 = self.off.steps[0], self.on.steps[0]
        own = on0.router_own
        layers = list(off0.routing_used["layers"])
        return {
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
            "engine": self.engine,
            "trainer": self.trainer,
            "model": str(self.model_dir),
            "geometry": self.geometry.to_dict(),
            "precision": {"engine": self._engine_precision(), "trainer": "float32"},
            "samples_requested": self.samples_requested,
            "samples_stored": self.collect.stored,
            "samples_rejected": self.collect.rejected,
            "samples_failed": self.collect.failed,
            "tokens_stored": self.collect.tokens_stored,
            "completion_tokens": off0.logp["tokens"],
            "validation": {"ok": self.validation.ok, "faults": len(self.validation.faults),
                           "samples": self.validation.samples,
                           "tokens": self.validation.tokens,
                           "regions": self.validation.tally.to_dict()["regions"]},
            "weights": {"converter": ("none: transformers loads the checkpoint; the figure is "
                                      "the replay hooks' effect outside a pass"
                                      if self.trainer == "hf"
                                      else "trainer_hooks.megatron.convert"),
                        "parameters": self.off.parameters,
                        "max_abs_logit_diff_fp32_vs_transformers": self.max_logit_diff},
            "agreement": {
                "replay_off": off0.routing_used["exact"],
                "replay_on": on0.routing_used["exact"],
                "replay_on_router_own": own.get("routing_replay/exact"),
                "blocks": off0.routing_used["blocks"],
                "native_blocks": {
                    "replay_off": off0.routing_used["native"]["blocks"],
                    "replay_on": on0.routing_used["native"]["blocks"],
                    "replay_on_router_own": own.get("routing_replay/native/tokens")},
                "overlap": {"replay_off": off0.routing_used["overlap"],
                            "replay_on": on0.routing_used["overlap"],
                            "replay_on_router_own": own.get("routing_replay/overlap")},
                "by_region": {r: {"replay_off": off0.routing_used[r]["exact"],
                                  "replay_on": on0.routing_used[r]["exact"],
                                  "replay_on_router_own": own.get(f"routing_replay/{r}/exact")}
                              for r in ("prompt", "completion")},
                "per_layer": {str(lay): {
                    "replay_off": off0.routing_used["layers"][lay]["exact"],
                    "replay_on": on0.routing_used["layers"][lay]["exact"],
                    "replay_on_router_own": own.get(f"routing_replay/layer{lay}/exact")}
                    for lay in layers},
                "measured": "step 0 forward: experts the trainer's routers used vs the rollout's "
                            "ids, exact set per (token, MoE layer) block; router_own: what the "
                            "routers would have chosen vs the replayed ids",
            },
            "k3_kl": {"replay_off": off0.logp["k3_kl"], "replay_on": on0.logp["k3_kl"]},
            "logp_abs_diff": {
                "mean": {"replay_off": off0.logp["mean_abs"], "replay_on": on0.logp["mean_abs"]},
                "max": {"replay_off": off0.logp["max_abs"], "replay_on": on0.logp["max_abs"]},
            },
            "direction": DIRECTION,
            "reward_mean": float(self.rewards.mean()),
            "steps": {"replay_off": [s.to_dict() for s in self.off.steps],
                      "replay_on": [s.to_dict() for s in self.on.steps]},
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "plot": str(self.plot),
        }


class _Clock:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.n = 0

    @contextmanager
    def step(self, key: str, what: str) -> Iterator[None]:
        self.n += 1
        self.progress(f"[{self.n}/{STEPS}] {what}")
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0


def _checkpoint(config: DemoConfig) -> Path:
    if config.model.dir:
        path = Path(config.model.dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.dir {path}: no config.json there")
        return path
    from reference_engine import make_tiny_model

    return make_tiny_model(config.out_dir / "model", seed=config.model.tiny_seed)


@contextmanager
def _trainer_world(config: DemoConfig) -> Iterator[None]:
    """megatron: a one-rank CPU megatron world; hf: the thread count only (each hf run sets
    up its own FSDP2 world of one)."""
    if config.train.trainer != "hf":
        from trainer_hooks.megatron.cpu_world import megatron_cpu_world

        with megatron_cpu_world(config.train.threads):
            yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(config.train.threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_demo(config: DemoConfig, progress: Progress = lambda _m: None) -> DemoResult:
    """Run every step; engines are shut down on return, on error and on Ctrl-C."""
    from trainer_hooks.megatron.convert import read_hf_config

    from replay_bridge.shards import ShardReader
    from .engines import running_engine
    from .plot import plot_demo
    from .rollouts import collect_rollouts, demo_prompts

    t_start = time.perf_counter()
    clock = _Clock(progress)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = out / "shards"
    c = config.collect

    with clock.step("checkpoint", "checkpoint"):
        model_dir = _checkpoint(config)
        geometry = RoutingGeometry.from_model_dir(model_dir)
        prompts = demo_prompts(model_dir, c.prompts)
    progress(f"      {model_dir}: {geometry.describe()}")

    with contextlib.ExitStack() as stack:
        with clock.step("engine_start", f"engine: {config.engine.kind}"):
            engine = stack.enter_context(running_engine(config.engine, model_dir, out))
        progress(f"      {engine.description}")
        with clock.step("collect", f"collect {c.prompts} prompts x {c.samples_per_prompt} "
                                   f"samples, {c.max_new_tokens} new tokens each"):
            summary = collect_rollouts(engine, geometry, prompts, c, shard_dir)
    progress(f"      stored {summary.stored}, rejected {summary.rejected}, failed "
             f"{summary.failed}; {summary.tokens_stored:,} tokens in {summary.seconds:.1f} s; "
             "engine stopped")

    with clock.step("validate", f"validate {shard_dir}"):
        report = validate_dir(shard_dir)
    progress(f"      {'clean' if report.ok else f'{len(report.faults)} faults'}: "
             f"{report.samples} samples, {report.tokens:,} tokens")

    reader = ShardReader(shard_dir)
    samples = list(reader)
    if not samples:
        raise BatchError("no sample was stored: nothing to train on (see the collect verdicts "
                         f"and {shard_dir}/quarantine)")
    target = target_tokens(int(read_hf_config(model_dir)["vocab_size"]),
                           config.train.reward_vocab_fraction, config.train.reward_seed)
    reward = rewards(samples, target)
    adv = group_advantages(reward, [s.group_id or s.sample_id for s in samples])
    micro = make_micro_batches(samples, dict(zip((s.sample_id for s in samples), adv)),
                               config.train.micro_batch_size)
    temperature = c.temperature

    hf = config.train.trainer == "hf"
    with _trainer_world(config):
        if hf:
            from .hf_trainer import hf_train_run as train_run
            from .hf_trainer import hooks_inert_difference

            with clock.step("weights_check", "weights: transformers (fp32) from the checkpoint, "
                                             "replay hooks attached vs none"):
                diff = hooks_inert_difference(model_dir, samples[0].tokens, reader,
                                              reader.geometry)
        else:
            from .trainer import train_run
            from .weights import max_logit_difference

            with clock.step("weights_check", "weights: megatron-core GPTModel (fp32) from the "
                                             "checkpoint vs transformers"):
                diff = max_logit_difference(model_dir, samples[0].tokens)
        progress(f"      max |logit difference| {diff:.2e}")
        runs = {}
        for replay in (False, True):
            name = "on" if replay else "off"
            with clock.step(f"train_replay_{name}",
                            f"train {config.train.steps} GRPO steps"
                            f"{' (transformers, FSDP2)' if hf else ''}, replay {name}"):
                runs[name] = train_run(model_dir, reader, reader.geometry, micro, config.train,
                                       replay=replay, temperature=temperature)
            s0 = runs[name].steps[0]
            progress(f"      step 0: agreement {s0.routing_used['exact']:.4f}, "
                     f"k3 KL {s0.logp['k3_kl']:.3g}")

    result = DemoResult(
        config=config, model_dir=model_dir, geometry=geometry, engine=engine.description,
        collect=summary, validation=report, max_logit_diff=diff, rewards=reward,
        off=runs["off"], on=runs["on"], plot=out / "demo.png", seconds=0.0,
    )
    with clock.step("plot", f"plot {result.plot}"):
        header, rows = result.validation_rows()
        plot_demo(result.plot, result.off, result.on, rows, header,
                  title=f"rollout routing replay: {engine.label} -> {result.trainer_label} "
                        "(float32), "
                        f"{summary.stored} samples, "
                        f"{result.off.steps[0].logp['tokens']:,} completion tokens")
    result.timings = clock.timings
    result.seconds = time.perf_counter() - t_start
    return result
