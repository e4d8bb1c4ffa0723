"""``replay-bridge bench ingest | shards | shard-layouts | collect | memory | dataset | cluster | layout``: the benchmarks, each printing one JSON
object (the measuring code lives in :mod:`replay_bridge.benchmarks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import bench_app
from ._output import die, emit_json


def _positive_ints(option: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, or a usage error naming ``option``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        die(f"{option} must be comma-separated integers, got {text!r}", as_json=True)
    if not values or min(values) < 1:
        die(f"{option} must be positive integers, got {text!r}", as_json=True)
    return values


@bench_app.command("ingest")
def bench_ingest(
    tokens: int = typer.Option(400_000, min=1, help="Tokens of SGLang traffic to generate."),
    model: str = typer.Option("qwen3-30b-a3b", help="Model preset, directory or config.json."),
    repeats: int = typer.Option(3, min=1, help="Rounds; figures are medians."),
    peer: bool = typer.Option(True, help="Also time the usual torch-based peer chain."),
    busy: bool = typer.Option(True, help="Also time floor and ingest while another process "
                                         "keeps one core busy."),
    workers: int = typer.Option(2, min=1, help="Also time ingest --workers N (1: do not)."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put temporary files."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Ingest time vs pybase64 b64decode of the same payloads (the floor) vs a peer chain,
    quiet and with one core busy; one process and --workers processes."""
    from ..benchmarks.ingest import run

    emit_json(run(tokens=tokens, model=model, repeats=repeats, peer=peer, busy=busy,
                  workers=workers, workdir=workdir))


@bench_app.command("shards")
def bench_shards(
    tokens: int = typer.Option(400_000, min=1000, help="Tokens of synthetic samples to store."),
    model: str = typer.Option("qwen3-30b-a3b", "--model", "-m", help="Geometry preset."),
    samples_per_shard: int = typer.Option(64, min=1),
    batch_bytes: Optional[int] = typer.Option(
        None, min=1, help="Routing bytes per record batch (default: the writer's)."),
    repeats: int = typer.Option(3, min=1, help="Timings are the best of this many runs."),
    lookups: int = typer.Option(200, min=1, help="Random per-sample lookups timed."),
    workdir: Optional[Path] = typer.Option(None, help="Where to write (default: temp dir)."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON (always printed)."),
) -> None:
    """Write the same realistic samples with zstd (levels), lz4 and none; report bytes per
    token (vs int32), write MB/s, read-back GB/s of routing arrays and lookups, side by side."""
    from ..benchmarks.shards import bench_shards as run
    from ..geometry import GeometryError

    try:
        result = run(tokens=tokens, preset=model, samples_per_shard=samples_per_shard,
                     batch_bytes=batch_bytes, repeats=repeats, lookups=lookups, workdir=workdir)
    except GeometryError as e:
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("shard-layouts")
def bench_shard_layouts(
    tokens: int = typer.Option(50_000, min=64, help="Routing rows (tokens) per data set."),
    models: str = typer.Option("qwen3-30b-a3b,deepseek-v3", "--models",
                               help="Geometry presets, comma-separated."),
    data: str = typer.Option("realistic,uniform", "--data",
                             help="Data sets: realistic (skewed, correlated), reordered (the "
                                  "same with each block's ids shuffled), uniform."),
    layouts: Optional[str] = typer.Option(
        None, "--layouts", help="Only these layouts, comma-separated (default: all)."),
    repeats: int = typer.Option(5, min=1, help="Interleaved rounds; figures are medians."),
    zipf_s: float = typer.Option(0.5, help="Realistic routing: Zipf exponent per layer."),
    stickiness: float = typer.Option(0.3, help="Realistic routing: p(keep previous id)."),
    seed: int = typer.Option(0),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Study the routing of this stored dataset (path or URI) "
                                "instead of synthetic data."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON (always printed)."),
) -> None:
    """A study, not the stored format: the same routing in candidate layouts (flat, layer-major,
    per-layer columns, sorted + permutation, bitmap, 7-bit packing, bit planes, repeat flags)
    x codecs, as ~2 MiB Arrow IPC record batches; bytes per token vs int32, write MB/s, read
    GB/s back to [rows, layers, k] in engine order (medians of interleaved rounds)."""
    from ..benchmarks.shard_layouts import DEFAULT_VARIANTS, LAYOUTS, run
    from ..geometry import GeometryError
    from ..shards import ShardError

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    sets = tuple(d.strip() for d in data.split(",") if d.strip())
    if not names:
        die(f"--models must name at least one preset, got {models!r}", as_json=True)
    if not sets or set(sets) - {"realistic", "reordered", "uniform"}:
        die(f"--data must be among realistic, reordered, uniform, got {data!r}", as_json=True)
    variants = DEFAULT_VARIANTS
    if layouts is not None:
        want = {x.strip() for x in layouts.split(",") if x.strip()}
        if not want or want - set(LAYOUTS):
            die(f"--layouts must be among {', '.join(LAYOUTS)}, got {layouts!r}", as_json=True)
        variants = tuple(v for v in DEFAULT_VARIANTS if v[0] in want)
    try:
        result = run(tokens=tokens, models=names, datasets=sets, repeats=repeats,
                     variants=variants, zipf_s=zipf_s, stickiness=stickiness, seed=seed,
                     dataset=dataset)
    except (GeometryError, ShardError, ValueError) as e:
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("collect")
def bench_collect(
    model: str = typer.Option("qwen3-30b-a3b", help="Model preset, directory or config.json."),
    engine: str = typer.Option("sglang", help="Wire format of the responder: sglang | vllm."),
    prompts: int = typer.Option(192, min=1, help="Prompts (one sample each)."),
    prompt_len: int = typer.Option(1024, min=1, help="Prompt tokens per sample."),
    max_new_tokens: int = typer.Option(1024, min=1, help="Completion tokens per sample."),
    concurrency: int = typer.Option(16, min=1, help="Requests in flight."),
    repeats: int = typer.Option(3, min=1, help="Rounds; figures are medians."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put temporary shards."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Client CPU time per token (receive, decode, check, store) against a light responder in
    another process, vs the ingest floor: pybase64 b64decode of the same payloads."""
    try:
        from ..benchmarks.collect import run
    except ImportError as e:
        die(f"bench collect needs the client extra (pip install "
            f"'routing-replay-bridge[client]'): {e}", as_json=True)

    if engine not in ("sglang", "vllm"):
        die(f"--engine must be sglang or vllm, got {engine!r}", as_json=True)
    try:
        result = run(model=model, engine=engine, prompts=prompts, prompt_len=prompt_len,
                     max_new_tokens=max_new_tokens, concurrency=concurrency, repeats=repeats,
                     workdir=workdir)
    except RuntimeError as e:  # the responder could not be started (or is not installed)
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("memory")
def bench_memory(
    samples: int = typer.Option(32, min=1, help="N: rejected samples of the small run."),
    factor: int = typer.Option(8, min=2, help="The large run has factor * N samples."),
    rows: int = typer.Option(20_000, min=16, help="Routing rows (tokens) per sample."),
    model: str = typer.Option("tiny-qwen3-moe", help="Model preset, directory or config.json."),
    concurrency: int = typer.Option(4, min=1, help="collect: requests in flight (keep "
                                    "N >= 8 x this, so the small run fills the pipeline)."),
    only: Optional[str] = typer.Option(None, help="Measure only ingest or only collect."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put temporary files."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Peak RSS of ingest and collect over N and factor*N samples that are all rejected (each
    measurement in a child process); memory must follow the samples in flight, not the number
    rejected (target: ratio <= 1.2)."""
    from ..benchmarks.memory import run
    from ..geometry import GeometryError

    if only not in (None, "ingest", "collect"):
        die(f"--only must be ingest or collect, got {only!r}", as_json=True)
    parts = ("ingest", "collect") if only is None else (only,)
    try:
        result = run(samples=samples, factor=factor, rows=rows, model=model,
                     concurrency=concurrency, workdir=workdir, parts=parts)
    except (GeometryError, RuntimeError) as e:
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("dataset")
def bench_dataset(
    sizes: str = typer.Option("1000,10000,100000", help="Dataset sizes (samples), comma-separated."),
    tokens: int = typer.Option(16, min=2, help="Tokens per sample."),
    ranks: int = typer.Option(64, min=1, help="Data-parallel ranks: one rank reads 1/ranks."),
    samples_per_batch: int = typer.Option(4, min=1, help="Samples per record batch (sets the "
                                          "writer's batch_bytes, as real samples would)."),
    model: str = typer.Option("qwen3-30b-a3b", help="Geometry preset."),
    repeats: int = typer.Option(5, min=1, help="Interleaved rounds; figures are medians."),
    s3: bool = typer.Option(True, "--s3/--no-s3", help="Also on an S3-compatible server on "
                            "loopback (needs moto[server])."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put the local datasets."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Open time and one rank's read throughput vs dataset size, local and S3 side by side
    (target: the largest dataset opens within 2x of the smallest)."""
    from ..benchmarks.dataset import run
    from ..geometry import GeometryError

    parsed = _positive_ints("--sizes", sizes)
    try:
        result = run(sizes=parsed, tokens=tokens, ranks=ranks,
                     samples_per_batch=samples_per_batch, preset=model, repeats=repeats, s3=s3,
                     workdir=workdir)
    except (GeometryError, RuntimeError) as e:
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("cluster")
def bench_cluster(
    workers: str = typer.Option("1,2,4", help="Ray collector worker counts, comma-separated."),
    prompts: int = typer.Option(256, min=1, help="Prompts per round (one sample each)."),
    prompt_len: int = typer.Option(256, min=1, help="Prompt tokens per sample."),
    max_new_tokens: int = typer.Option(256, min=1, help="Completion tokens per sample."),
    model: str = typer.Option("qwen3-30b-a3b", help="Model preset, directory or config.json."),
    engine: str = typer.Option("sglang", help="Wire format of the responders: sglang | vllm."),
    concurrency: int = typer.Option(16, min=1, help="Requests in flight per worker."),
    repeats: int = typer.Option(3, min=1, help="Interleaved rounds; figures are medians."),
    workdir: Optional[Path] = typer.Option(None, help="Where to put the datasets."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Distributed collect (Ray) throughput against worker count, each worker with its own
    light responder, all writing into one dataset."""
    from ..benchmarks.cluster import run
    from ..geometry import GeometryError

    counts = _positive_ints("--workers", workers)
    if engine not in ("sglang", "vllm"):
        die(f"--engine must be sglang or vllm, got {engine!r}", as_json=True)
    try:
        result = run(workers=counts, prompts=prompts, prompt_len=prompt_len,
                     max_new_tokens=max_new_tokens, model=model, engine=engine,
                     concurrency=concurrency, repeats=repeats, workdir=workdir)
    except (GeometryError, RuntimeError) as e:
        die(str(e), as_json=True)
    emit_json(result)


@bench_app.command("layout")
def bench_layout(
    tokens: int = typer.Option(4096, min=64, help="Router tokens of the micro-batch."),
    models: str = typer.Option("qwen3-30b-a3b,deepseek-v3", "--models",
                               help="Geometry presets, comma-separated (the first one is the "
                                    "target's)."),
    repeats: int = typer.Option(5, min=1, help="Interleaved rounds; figures are medians."),
    calls: int = typer.Option(20, min=1, help="Layouts per contender and round (mean per call)."),
    seed: int = typer.Option(0, help="Seed of the synthetic micro-batch."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="JSON output (the default)."),
) -> None:
    """Milliseconds to lay out one micro-batch's routing on one core (thd, bshd, thd under
    CP2 x SP2), before and after the vectorised copy paths, with and without the id check,
    and where the time goes (target: < 2 ms for 4096 tokens x 48 layers x top-8)."""
    from ..benchmarks.layout import run
    from ..geometry import GeometryError

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        die(f"--models must name at least one preset, got {models!r}", as_json=True)
    try:
        result = run(tokens=tokens, models=names, repeats=repeats, calls=calls, seed=seed)
    except GeometryError as e:
        die(str(e), as_json=True)
    emit_json(result)
