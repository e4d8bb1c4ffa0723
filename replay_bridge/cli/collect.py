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
from ._inputs import check_compression, check_input_file, check_out, dataset_uri, model_geometry
from ._output import (EXIT_FAULTS, EXIT_OK, EXIT_USAGE, die, emit_json, escape_markup,
                      progress, shown, stderr)
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
    endpoints: list[str] = typer.Option(..., "--endpoint", help="Engine base URL, e.g. "
                                        "http://127.0.0.1:30000; with --ray, repeat it: the "
                                        "workers share the endpoints round-robin."),
    engine: str = typer.Option(..., "--engine", "-e", help="sglang | sglang-openai | vllm"),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="JSONL of {prompt_id, input_ids} "
                                 "or {prompt_id, text}."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory (geometry and, for "
                              "text prompts, tokenizer), config.json, or preset name."),
    out: str = typer.Option(..., "--out", "-o", help="Dataset URI: a directory, file://, "
                            "s3://bucket/prefix (endpoint and keys from the AWS_* "
                            "environment), gs://, ..."),
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
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Collect with --workers actors on a Ray cluster: ADDRESS as ray.init takes it "
             "(auto: $RAY_ADDRESS or the cluster running on this machine; local: a new one "
             "here; or host:port / ray://...). Needs the ray extra."),
    workers: int = typer.Option(2, "--workers", min=1, help="With --ray: collector actors "
                                "(each with its own writer; --concurrency is per worker)."),
    worker_cpus: float = typer.Option(1.0, "--worker-cpus", min=0.0, help="With --ray: CPUs "
                                      "Ray reserves for each worker."),
) -> None:
    """Generate rollouts from a live engine; check every sample's routing and store it.

    Exit 0 when every sample was stored, 1 when some were rejected or failed (or, with --ray,
    left unfinished because every worker died), 2 on bad input.
    """
    _require_client_extra(as_json)
    from ..client import RetryPolicy, RolloutClient, SamplingParams, read_prompts

    if ray_address is None and len(endpoints) > 1:
        die("several --endpoint need --ray (one process talks to one endpoint)",
            as_json=as_json)
    if ray_address is not None:
        _require_ray_extra(as_json)
    endpoint = endpoints[0]
    for e in endpoints:
        _check_endpoint(e, as_json)
    geometry = _check_inputs(endpoint, engine, prompts, model, out, resume, as_json)
    retry = RetryPolicy(max_attempts=retries + 1, max_delay=max_retry_delay,
                        max_elapsed=retry_seconds)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    model_dir = Path(model)
    if ray_address is not None:
        check_compression(compression, as_json)
        _collect_on_ray(
            ray_address, as_json, endpoints=endpoints, engine=engine,
            prompts=read_prompts(prompts, tokenizer=model_dir if model_dir.is_dir() else None),
            geometry=geometry, out=out, workers=workers, samples_per_prompt=samples_per_prompt,
            params=params, served_model=served_model, concurrency=concurrency,
            timeout=timeout, retry=retry, max_response_bytes=int(max_response_mb * (1 << 20)),
            api_key_env=api_key_env, samples_per_shard=samples_per_shard,
            compression=compression, keep_verdicts=as_json,
            total_prompts=_count_lines(prompts), num_cpus=worker_cpus)
    writer = _open_writer(out, geometry, resume, samples_per_shard, compression, as_json)
    client = RolloutClient(
        endpoint, engine, geometry, model=served_model,
        params=params, concurrency=concurrency, timeout=timeout, retry=retry,
        max_response_bytes=int(max_response_mb * (1 << 20)), api_key_env=api_key_env,
    )
    source = read_prompts(prompts, tokenizer=model_dir if model_dir.is_dir() else None)
    summary = _run(client, source, writer, out, samples_per_prompt,
                   _count_lines(prompts) * samples_per_prompt, as_json)
    if as_json:
        emit_json({
            "out": shown(out),
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


def _require_ray_extra(as_json: bool) -> None:
    """Exit 2 when Ray (the ray extra) is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        die(f"collect --ray needs the ray extra (pip install 'routing-replay-bridge[ray]'): {e}",
            as_json=as_json)


def _check_endpoint(endpoint: str, as_json: bool) -> None:
    from ..client import redact

    if not endpoint.startswith(("http://", "https://")):
        die(f"--endpoint must be an http(s) URL, got {redact(endpoint)!r}", as_json=as_json)


def _check_inputs(endpoint: str, engine: str, prompts: Path, model: str, out: str,
                  resume: bool, as_json: bool) -> RoutingGeometry:
    """The routing geometry of ``model``, or exit 2 naming the first bad argument."""
    from ..protocols import PROTOCOLS as ENGINES

    if engine not in ENGINES:
        die(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}", as_json=as_json)
    out = dataset_uri(out, "--out", as_json)
    check_input_file(prompts, as_json)
    _check_endpoint(endpoint, as_json)
    geometry = model_geometry(model, as_json)
    check_out(out, geometry, add=resume, flag="--resume", as_json=as_json)
    return geometry


def _collect_on_ray(address: str, as_json: bool, **options: Any) -> None:
    """``collect --ray``: the distributed collect with one progress bar, its summary, and the
    exit code."""
    from ..client import PromptError
    from ..ray import collect_with_tally

    total = options["total_prompts"] * options["samples_per_prompt"]
    with progress(enabled=not as_json) as bar:
        task = bar.add_task("collect", total=total, status="")
        t0 = time.perf_counter()

        def on_progress(done: int, _total: int, t: dict[str, int]) -> None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done,
                       status=f"{t['samples'] / dt:.1f} samples/s, {t['stored']} stored, "
                              f"{t['rejected']} rejected, {t['failed']} failed")

        try:
            summary, tally = collect_with_tally(address=address,
                                                on_progress=on_progress, **options)
        except PromptError as e:
            die(str(e), as_json=as_json)
        except (ConnectionError, RuntimeError, ValueError) as e:
            die(f"collect --ray failed: {e}", as_json=as_json)
    t = summary["totals"]
    if as_json:
        emit_json(summary)
    else:
        _print_ray_summary(summary, tally)
    ok = t["rejected"] == 0 and t["failed"] == 0 and t["unfinished_prompts"] == 0
    raise typer.Exit(EXIT_OK if ok else EXIT_FAULTS)


def _print_ray_summary(summary: dict[str, Any], tally: Any) -> None:
    """The totals line, one line per worker, the first samples not stored and the check table,
    on stderr."""
    t = summary["totals"]
    skipped = (f", {t['prompts_skipped']} prompts already stored"
               if t["prompts_skipped"] else "")
    stderr.print(
        f"[bold]{t['stored']}[/] stored, [bold]{t['rejected']}[/] rejected, "
        f"[bold]{t['failed']}[/] failed of {t['samples']} samples from {t['prompts']} prompts"
        f"{skipped} in {t['seconds']:.2f} s ({t['tokens_per_s'] or 0:,.0f} tok/s) with "
        f"{len(summary['workers'])} workers -> {escape_markup(summary['out'])}")
    for w in summary["workers"]:
        line = (f"  worker {w['worker']} ({escape_markup(w['host'])}, "
                f"{escape_markup(', '.join(w['endpoints']))}): {w['status']}, "
                f"{w['stored']} stored, {w['rejected']} rejected, {w['failed']} failed")
        if w["error"]:
            line += f" - {escape_markup(w['error'])}"
        stderr.print(line)
    if summary["passes"] > 1:
        stderr.print(f"prompts of dead workers collected again: {summary['passes']} passes")
    if summary["unfinished"]:
        first = ", ".join(summary["unfinished"][:10])
        stderr.print(f"[bold red]{len(summary['unfinished'])} prompts unfinished[/] (every "
                     f"worker died): {escape_markup(first)} ... rerun with --resume")
    if summary["first_rejected"]:
        stderr.print(verdict_table(summary["first_rejected"]))
    stderr.print(check_table(tally))


def _open_writer(out: str, geometry: RoutingGeometry, resume: bool, samples_per_shard: int,
                 compression: str | None, as_json: bool) -> ShardWriter:
    """The shard writer of ``out`` (resumed with ``--resume``), or exit 2."""
    from ..shards import ShardError, ShardWriter

    options: dict[str, Any] = {"samples_per_shard": samples_per_shard, "resume": resume}
    if compression is not None:
        options["compression"] = compression
    try:
        return ShardWriter(out, geometry, **options)
    except (ShardError, OSError, ValueError) as e:
        die(f"cannot open {shown(out)}: {e}", as_json=as_json)


def _run(client: RolloutClient, source: Iterable[Prompt], writer: ShardWriter, out: str,
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
            error = f"cannot write {shown(out)}: {e}"
        except (KeyboardInterrupt, asyncio.CancelledError):
            error = "interrupted; what was stored is sealed: rerun with --resume to finish"
        finally:
            try:
                writer.close()
            except (ShardError, OSError, ValueError) as e:
                error = error or f"cannot seal {shown(out)}: {e}"
    if error is not None or summary is None:
        die(error or "collection stopped", code=EXIT_USAGE, as_json=as_json)
    return summary


def _print_summary(summary: CollectSummary, out: str) -> None:
    """The totals line, the first samples not stored and the check table, on stderr."""
    skipped = (f", {summary.prompts_skipped} prompts already stored"
               if summary.prompts_skipped else "")
    stderr.print(
        f"[bold]{summary.stored}[/] stored, [bold]{summary.rejected}[/] rejected, "
        f"[bold]{summary.failed}[/] failed of {summary.samples} samples from "
        f"{summary.prompts} prompts{skipped} in {summary.seconds:.2f} s "
        f"({summary.tokens / max(summary.seconds, 1e-9):,.0f} tok/s) -> "
        f"{escape_markup(shown(out))}")
    if summary.first_rejected:
        stderr.print(verdict_table(summary.first_rejected))
        more = summary.rejected + summary.failed - len(summary.first_rejected)
        if more > 0:
            stderr.print(f"... and {more} more rejected or failed: --json lists every one")
    stderr.print(check_table(summary.tally))
