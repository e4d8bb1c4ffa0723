"""``replay-bridge demo``: the whole trip on this machine, replay off vs on (see
``replay_recipes.demo``). Progress on stderr, figures on stdout (``--json``: one object)."""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from replay_bridge.cli import EXIT_FAULTS, EXIT_OK, EXIT_USAGE, die, emit_json, stderr, stdout


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _print_human(result: Any, fig: dict[str, Any]) -> None:
    from rich.table import Table

    from replay_bridge.cli import check_table

    from rich.console import Console

    # Piped output: render tables 120 columns wide instead of squeezing them into 80.
    out = stdout if stdout.is_terminal else Console(width=120, highlight=False, soft_wrap=True)

    def show(table: Table) -> None:
        out.print(table)

    stdout.print(f"[bold]engine[/]: {fig['engine']}")
    stdout.print(f"[bold]samples[/]: {fig['samples_stored']} of {fig['samples_requested']} "
                 f"stored ({fig['samples_rejected']} rejected, {fig['samples_failed']} failed), "
                 f"{fig['tokens_stored']:,} tokens")
    show(check_table(result.validation.tally, title="shard validation: stored routing re-checked"))
    a, k3, d = fig["agreement"], fig["k3_kl"], fig["logp_abs_diff"]
    t = Table(title=f"rollout (engine, bf16) vs trainer ({result.trainer_label}, fp32), step 0 "
                    "forward",
              title_justify="left")
    for col in ("", "replay off", "replay on"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("routing agreement: experts used = rollout's", _pct(a["replay_off"]),
              _pct(a["replay_on"]))
    t.add_row("  router's own top-k = rollout's", _pct(a["replay_off"]),
              _pct(a["replay_on_router_own"]))
    t.add_row("k3 KL(rollout ‖ trainer)", _num(k3["replay_off"]), _num(k3["replay_on"]))
    t.add_row("mean |Δ log p|", _num(d["mean"]["replay_off"]), _num(d["mean"]["replay_on"]))
    t.add_row("max |Δ log p|", _num(d["max"]["replay_off"]), _num(d["max"]["replay_on"]))
    native = a["native_blocks"]["replay_on"]
    t.caption = (f"{a['blocks']:,} (token, MoE layer) blocks with rollout routing, "
                 f"{fig['completion_tokens']:,} completion tokens; Δ = trainer - rollout"
                 + (f"; {native:,} native blocks (no rollout routing: routed by the "
                    "trainer's own top-k) counted apart" if native else ""))
    show(t)

    t = Table(title="agreement per MoE layer (step 0)", title_justify="left")
    for col in ("layer", "replay off", "replay on: used", "replay on: router's own"):
        t.add_column(col, justify="right")
    for layer, v in a["per_layer"].items():
        t.add_row(layer, _pct(v["replay_off"]), _pct(v["replay_on"]),
                  _pct(v["replay_on_router_own"]))
    show(t)

    t = Table(title="training steps (each step's forward, before its update)",
              title_justify="left")
    t.caption = "agree: experts used = rollout's; own on: router's own top-k under replay"
    for col in ("step", "agree off", "agree on", "own on", "k3 off", "k3 on", "loss off",
                "loss on"):
        t.add_column(col, justify="right")
    for off, on in zip(fig["steps"]["replay_off"], fig["steps"]["replay_on"]):
        t.add_row(str(off["step"]), _pct(off["agreement"]), _pct(on["agreement"]),
                  _pct(on["router_own_agreement"]), _num(off["k3_kl"]), _num(on["k3_kl"]),
                  f"{off['loss']:+.4f}", f"{on['loss']:+.4f}")
    show(t)
    stdout.print(
        f"Without replay the trainer routed {_pct(a['replay_off'])} of (token, layer) blocks "
        f"as the rollout did; with replay {_pct(a['replay_on'])}. k3 KL "
        f"{_num(k3['replay_off'])} -> {_num(k3['replay_on'])}, max |Δ log p| "
        f"{_num(d['max']['replay_off'])} -> {_num(d['max']['replay_on'])}. "
        f"Figure: {fig['plot']} ({fig['seconds']:.0f} s)")


def demo(
    config: Optional[Path] = typer.Option(None, "--config",
                                          help="demo YAML (default: the packaged default.yaml)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: out/demo)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="reference | vllm"),
    endpoint: Optional[str] = typer.Option(
        None, "--endpoint", help="vllm: base URL of a server already serving --model"),
    start_vllm: Optional[bool] = typer.Option(
        None, "--start-vllm/--no-start-vllm",
        help="vllm: start one from .venv-vllm on a free loopback port"),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Qwen3-MoE checkpoint directory (default: make the tiny one)"),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="N prompts [16]"),
    samples: Optional[int] = typer.Option(None, "--samples", help="G samples per prompt [4]"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="[64]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps per run [4]"),
    trainer: Optional[str] = typer.Option(
        None, "--trainer", help="megatron (megatron-core) | hf (transformers) [megatron]"),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="any config key: --set train.lr=1e-4 (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as one JSON object"),
) -> None:
    """Make the tiny Qwen3-MoE, serve it (PD: prefill, decode, router; bf16), collect N x G
    samples with routing and log-probs into shards, validate them, load the same weights into
    megatron-core (fp32; --trainer hf: transformers, fp32) and run a few GRPO steps with routing replay off and on; print the
    routing agreement and log-prob mismatch of both, and plot them.

    Exit 0 when every sample was stored, the shards validate clean and replay is exact;
    1 otherwise; 2 on a usage error or an engine that cannot be started or reached.
    """
    t0 = time.perf_counter()
    from replay_recipes.demo import ConfigError, load_config

    try:
        cfg = load_config(config, sets=list(sets or []), overrides={
            "out": str(out) if out is not None else None,
            "engine.kind": engine,
            "engine.endpoint": endpoint,
            "engine.start_vllm": start_vllm,
            "model.dir": str(model) if model is not None else None,
            "collect.prompts": prompts,
            "collect.samples_per_prompt": samples,
            "collect.max_new_tokens": max_new_tokens,
            "train.steps": steps,
            "train.trainer": trainer,
        })
    except ConfigError as e:
        die(str(e), EXIT_USAGE, as_json)

    from transformers.utils import logging as hf_logging

    from replay_recipes.demo import run_demo
    from replay_recipes.demo.batches import BatchError
    from replay_recipes.demo.engines import EngineError
    from replay_recipes.demo.rollouts import fresh_shard_dir

    hf_logging.disable_progress_bar()

    def progress(message: str) -> None:
        stderr.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {message}", soft_wrap=True)

    try:
        fresh_shard_dir(cfg.out_dir / "shards")
    except FileExistsError as e:
        die(str(e), EXIT_USAGE, as_json)
    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds like Ctrl-C: engines are shut down

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"megatron\..*")
            warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
            result = run_demo(cfg, progress)
    except (EngineError, FileNotFoundError) as e:
        die(str(e), EXIT_USAGE, as_json)
    except BatchError as e:  # stored samples the trainer cannot use (no log-probs, ...)
        die(str(e), EXIT_FAULTS, as_json)
    finally:
        signal.signal(signal.SIGTERM, previous)
    fig = result.figures()
    fig["seconds"] = round(time.perf_counter() - t0, 2)  # the whole command, imports included
    (cfg.out_dir / "demo.json").write_bytes(orjson.dumps(fig, option=orjson.OPT_INDENT_2))
    if as_json:
        emit_json(fig)
    else:
        _print_human(result, fig)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAULTS)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``replay-bridge`` app."""
    app.command("demo")(demo)
