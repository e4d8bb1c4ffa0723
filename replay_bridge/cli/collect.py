"""``replay-bridge collect`` (live collection from an engine) and ``bench collect``."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ._app import app
from ._inputs import check_input_file, model_geometry
from ._output import (EXIT_FAULTS, EXIT_OK, EXIT_USAGE, die, emit_json, escape_markup,
                      progress, stderr)
from ._tables import check_table, verdict_table

if TYPE_CHECKING:
    from ..client import CollectSummary, Prompt, RolloutClient
    from ..geometry import RoutingGeometry
    from ..shards import ShardWriter


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


async def _run_cancellable(coro: Any) -> Any:
    """Run ``coro``; SIGTERM cancels it (so the shard writer seals what is stored)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
        pass
    try:
        return await task
    finally:
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass


@app.command()
def collect(
    endpoint: str = typer.Option(..., "--endpoint", help="Engine base URL, e.g. "
                                 "http://127.0.0.1:30000"),
    engine: str = typer.Option(..., "--engine", "-e", help="sglang | sglang-openai | vllm"),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="JSONL of {prompt_id, input_ids} "
                                 "or {prompt_id, text}."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory (geometry and, for "
                              "text prompts, tokenizer), config.json, or preset name."),
    out: Path = typer.Option(..., "--out", "-o", help="Shard directory."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", "-G", min=1,
                                           help="Samples per prompt (GRPO group size)."),
    max_new_tokens: int = typer.Option(128, min=0, help="Completion tokens per sample."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature."),
    concurrency: int = typer.Option(64, min=1, help="Requests in flight at most."),
    resume: bool = typer.Option(False, "--resume", help="Add to --out, skipping sample ids "
                                "already stored there."),
    served_model: Optional[str] = typer.Option(None, help="`model` field of OpenAI requests "
                                               "(default: none; the server's only model)."),
    timeout: float = typer.Option(600.0, min=0.001, help="Seconds per request."),
    retries: int = typer.Option(5, min=0, help="Retries per request on connection errors, "
                                "timeouts and 5xx (never on 4xx), at least."),
    retry_seconds: float = typer.Option(120.0, min=0.0, help="Keep retrying a request for this "
                                        "long after its first try, however many retries that "
                                        "takes: an engine outage shorter than this is "
                                        "survived (0: count --retries only)."),
    max_retry_delay: float = typer.Option(8.0, min=0.0, help="Cap on one backoff delay (s)."),
    max_response_mb: float = typer.Option(1024.0, min=0.001, help="Largest response accepted."),
    api_key_env: str = typer.Option("REPLAY_BRIDGE_API_KEY", help="Environment variable "
                                    "holding the bearer token (never printed or stored)."),
    samples_per_shard: int = typer.Option(1024, min=1, help="Samples per shard file."),
    compression: Optional[str] = typer.Option(None, help="zstd | lz4 | none (default: zstd)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: totals, the "
                                 "check table and every sample's verdict."),
) -> None:
    """Generate rollouts from a live engine; check every sample's routing and store it.

    Exit 0 when every sample was stored, 1 when some were rejected or failed, 2 on bad input.
    """
    _require_client_extra(as_json)
    from ..client import RetryPolicy, RolloutClient, SamplingParams, read_prompts

    geometry = _check_inputs(endpoint, engine, prompts, model, out, resume, as_json)
    writer = _open_writer(out, geometry, resume, samples_per_shard, compression, as_json)
    client = RolloutClient(
        endpoint, engine, geometry, model=served_model,
        params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
        concurrency=concurrency, timeout=timeout,
        retry=RetryPolicy(max_attempts=retries + 1, max_delay=max_retry_delay,
                          max_elapsed=retry_seconds),
        max_response_bytes=int(max_response_mb * (1 << 20)), api_key_env=api_key_env,
    )
    model_dir = Path(model)
    source = read_prompts(prompts, tokenizer=model_dir if model_dir.is_dir() else None)
    summary = _run(client, source, writer, out, samples_per_prompt,
                   _count_lines(prompts) * samples_per_prompt, as_json)
    if as_json:
        emit_json({
            "out": str(out),
            "geometry": geometry.to_dict(),
            "engine": engine,
            "endpoint": client.transport.redact(endpoint),
            "samples_per_prompt": samples_per_prompt,
            "seconds": round(summary.seconds, 3),
            "totals": summary.totals(),
            "check": summary.tally.to_dict(),
            "shards": writer.stats.to_dict(),
            "samples": summary.verdicts,
        })
    else:
        _print_summary(summary, out)
    raise typer.Exit(EXIT_OK if summary.rejected == 0 and summary.failed == 0 else EXIT_FAULTS)


def _require_client_extra(as_json: bool) -> None:
    """Exit 2 when the client's extra (aiohttp) is not installed."""
    try:
        from .. import client  # noqa: F401
    except ImportError as e:
        die(f"collect needs the client extra (pip install 'routing-replay-bridge[client]'): {e}",
            as_json=as_json)


def _check_inputs(endpoint: str, engine: str, prompts: Path, model: str, out: Path,
                  resume: bool, as_json: bool) -> RoutingGeometry:
    """The routing geometry of ``model``, or exit 2 naming the first bad argument."""
    from ..client import redact
    from ..protocols import PROTOCOLS as ENGINES

    if engine not in ENGINES:
        die(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}", as_json=as_json)
    check_input_file(prompts, as_json)
    if not endpoint.startswith(("http://", "https://")):
        die(f"--endpoint must be an http(s) URL, got {redact(endpoint)!r}", as_json=as_json)
    geometry = model_geometry(model, as_json)
    if out.exists() and not out.is_dir():
        die(f"{out} is not a directory", as_json=as_json)
    if out.exists() and any(out.iterdir()) and not resume:
        die(f"{out} exists and is not empty; pass --resume to continue a collection there",
            as_json=as_json)
    return geometry


def _open_writer(out: Path, geometry: RoutingGeometry, resume: bool, samples_per_shard: int,
                 compression: str | None, as_json: bool) -> ShardWriter:
    """The shard writer of ``out`` (resumed with ``--resume``), or exit 2."""
    from ..shards import ShardError, ShardWriter

    options: dict[str, Any] = {"samples_per_shard": samples_per_shard, "resume": resume}
    if compression is not None:
        options["compression"] = compression
    try:
        return ShardWriter(out, geometry, **options)
    except (ShardError, OSError, ValueError) as e:
        die(f"cannot open {out}: {e}", as_json=as_json)


def _run(client: RolloutClient, source: Iterable[Prompt], writer: ShardWriter, out: Path,
         samples_per_prompt: int, total: int, as_json: bool) -> CollectSummary:
    """Collect with a progress bar; SIGTERM and Ctrl-C seal what was stored. The writer is
    closed on every path; any error exits 2."""
    from ..client import PromptError
    from ..client import collect as run_collect
    from ..shards import ShardError

    t0 = time.perf_counter()
    error: str | None = None
    summary = None
    with progress(enabled=not as_json) as bar:
        task = bar.add_task("collect", total=total, status="")

        def on_result(s: Any, results: list) -> None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=len(results),
                       status=f"{s.samples / dt:.1f} samples/s, {s.tokens / dt:,.0f} tok/s, "
                              f"{s.rejected} rejected, {s.failed} failed")

        async def go() -> Any:
            async with client:
                return await run_collect(client, source, writer,
                                         samples_per_prompt=samples_per_prompt,
                                         keep_verdicts=as_json, on_result=on_result)

        try:
            summary = asyncio.run(_run_cancellable(go()))
        except PromptError as e:
            error = str(e)
        except (ShardError, OSError) as e:
            error = f"cannot write {out}: {e}"
        except (KeyboardInterrupt, asyncio.CancelledError):
            error = "interrupted; what was stored is sealed: rerun with --resume to finish"
        finally:
            try:
                writer.close()
            except (ShardError, OSError, ValueError) as e:
                error = error or f"cannot seal {out}: {e}"
    if error is not None or summary is None:
        die(error or "collection stopped", code=EXIT_USAGE, as_json=as_json)
    return summary


def _print_summary(summary: CollectSummary, out: Path) -> None:
    """The totals line, the first samples not stored and the check table, on stderr."""
    skipped = (f", {summary.prompts_skipped} prompts already stored"
               if summary.prompts_skipped else "")
    stderr.print(
        f"[bold]{summary.stored}[/] stored, [bold]{summary.rejected}[/] rejected, "
        f"[bold]{summary.failed}[/] failed of {summary.samples} samples from "
        f"{summary.prompts} prompts{skipped} in {summary.seconds:.2f} s "
        f"({summary.tokens / max(summary.seconds, 1e-9):,.0f} tok/s) -> {escape_markup(out)}")
    if summary.first_rejected:
        stderr.print(verdict_table(summary.first_rejected))
        more = summary.rejected + summary.failed - len(summary.first_rejected)
        if more > 0:
            stderr.print(f"... and {more} more rejected or failed: --json lists every one")
    stderr.print(check_table(summary.tally))
