"""``replay-bridge serve``, ``route`` and ``make-tiny-model``: the reference engine's commands,
added to the CLI as a plugin (entry point ``replay_bridge.commands``, :func:`register`).

The engine (torch, transformers, aiohttp: the ``server`` extra) is imported inside each command,
so the rest of the CLI starts without it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from replay_bridge.cli import EXIT_USAGE, die, emit_json, stderr

_FAULT_HELP = ("inject a fault: prefill-zero-rows, drop-routed-experts, duplicate-ids, extra-row;"
               " serve only: stale-prompt-rows; route only: no-merge")


def _import_server(as_json: bool, needs_model: bool = True) -> Any:
    try:
        import reference_engine as server

        if not needs_model:
            import aiohttp  # noqa: F401 - the router needs only aiohttp
            return server
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        die(f"the reference engine needs the 'server' extra "
            f"(pip install 'routing-replay-bridge[server]'): {e}", EXIT_USAGE, as_json)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process is a CLI command: keep stderr readable
    return server


async def _serve_forever(make_app: Any, host: str, port: int, announce: dict[str, Any],
                         as_json: bool) -> None:
    from reference_engine import serve_app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_app(make_app(), host, port) as url:
        info = {"url": url, **announce}
        if as_json:  # one line, so a parent process can readline() it
            sys.stdout.buffer.write(orjson.dumps(info) + b"\n")
            sys.stdout.flush()
        else:
            stderr.print(f"[bold green]ready[/] {url} " + " ".join(
                f"{k}={v}" for k, v in announce.items() if v is not None))
        await stop.wait()


def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="directory to write the checkpoint into"),
    seed: int = typer.Option(0, help="weight seed (same seed, same files)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
) -> None:
    """Write a deterministic tiny Qwen3-MoE (4 layers, top-2 of 8 experts) and its tokenizer."""
    server = _import_server(as_json)
    if out_dir.exists() and not out_dir.is_dir():
        die(f"{out_dir} exists and is not a directory", EXIT_USAGE, as_json)
    path = server.make_tiny_model(out_dir, seed=seed)
    from replay_bridge.geometry import RoutingGeometry

    geometry = RoutingGeometry.from_model_dir(path)
    files = sorted(p.name for p in path.iterdir())
    if as_json:
        emit_json({"path": str(path), "seed": seed, "geometry": geometry.to_dict(),
                   "files": files})
    else:
        stderr.print(f"wrote {path}: {geometry.describe()}")


def serve_cmd(
    model: Path = typer.Option(..., "--model", help="Hugging Face MoE checkpoint directory"),
    role: str = typer.Option("unified", help="unified | prefill | decode"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(30000, help="port to listen on (0: a free one)"),
    fault: Optional[str] = typer.Option(None, help=_FAULT_HELP),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32 | float16"),
    weight_version: str = typer.Option("default", help="reported as meta_info.weight_version"),
    threads: int = typer.Option(1, help="torch CPU threads"),
    no_routed_experts: bool = typer.Option(
        False, "--no-routed-experts", help="serve as SGLang without --enable-return-routed-experts"),
    as_json: bool = typer.Option(False, "--json", help="print {url, role, ...} once listening"),
) -> None:
    """Serve a MoE model over SGLang's protocol, capturing real router top-k ids."""
    server = _import_server(as_json)
    if role not in server.ROLES:
        die(f"--role must be one of {', '.join(server.ROLES)}, got {role!r}", EXIT_USAGE, as_json)
    if fault is not None and fault not in server.WORKER_FAULTS:
        die(f"--fault {fault!r} is not a worker fault; choose one of "
            f"{', '.join(server.WORKER_FAULTS)} (no-merge is a router fault)", EXIT_USAGE, as_json)
    if not (model / "config.json").exists():
        die(f"--model {model}: no config.json there", EXIT_USAGE, as_json)
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        runner = server.ModelRunner(model, dtype=dtype)
    except ValueError as e:
        die(f"cannot serve {model}: {e}", EXIT_USAGE, as_json)
    config = server.WorkerConfig(role=role, fault=fault, weight_version=weight_version,
                                 return_routed_experts=not no_routed_experts)
    try:
        worker_app = server.make_worker_app(runner, config)
    except ValueError as e:
        die(str(e), EXIT_USAGE, as_json)
    asyncio.run(_serve_forever(lambda: worker_app, host, port, {
        "role": role, "model": str(model), "dtype": dtype, "fault": fault,
        "geometry": runner.geometry.to_dict()}, as_json))


def route_cmd(
    prefill: str = typer.Option(..., "--prefill", help="prefill worker base URL"),
    decode: str = typer.Option(..., "--decode", help="decode worker base URL"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(30080, help="port to listen on (0: a free one)"),
    fault: Optional[str] = typer.Option(None, help=_FAULT_HELP),
    bootstrap_port: int = typer.Option(8998, help="bootstrap_port added to requests"),
    as_json: bool = typer.Option(False, "--json", help="print {url, ...} once listening"),
) -> None:
    """A PD router that merges prefill and decode routing like SGLang's gateway."""
    server = _import_server(as_json, needs_model=False)
    if fault is not None and fault not in server.ROUTER_FAULTS:
        die(f"--fault must be one of {', '.join(server.ROUTER_FAULTS)}, got {fault!r}",
            EXIT_USAGE, as_json)
    for name, url in (("--prefill", prefill), ("--decode", decode)):
        if not url.startswith(("http://", "https://")):
            die(f"{name} must be an http(s) URL, got {url!r}", EXIT_USAGE, as_json)
    config = server.RouterConfig(prefill, decode, fault=fault, bootstrap_port=bootstrap_port)
    asyncio.run(_serve_forever(lambda: server.make_router_app(config), host, port, {
        "role": "router", "prefill": prefill, "decode": decode, "fault": fault}, as_json))


def register(app: typer.Typer) -> None:
    """Add ``make-tiny-model``, ``serve`` and ``route`` to the ``replay-bridge`` app."""
    app.command("make-tiny-model")(make_tiny_model_cmd)
    app.command("serve")(serve_cmd)
    app.command("route")(route_cmd)
