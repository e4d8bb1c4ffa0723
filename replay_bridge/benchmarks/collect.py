"""``bench collect``: the client's CPU time per token against the ingest floor.

A light responder (``python -m reference_engine.loopback``, the reference engine's package;
started as a process, never imported) runs in its own process, so only the client's work is
timed: receiving the answers, decoding, checking and storing (``time.process_time`` of this
process, every thread included). The floor is pybase64 ``b64decode`` of the same routing
payloads given as bytes: no client can do less than decode them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64

from ..checks import accept, scan_is_compiled
from ..geometry import RoutingGeometry
from ..shards import ShardWriter
from ..protocols import decode_response, get_protocol
from ..client import HTTPTransport, Prompt, RolloutClient, SamplingParams, collect
from .responder import start_responder, stop_responder

__all__ = ["run"]


def _raw_receive_cpu(url: str, calls: list[tuple[str, dict[str, Any]]]) -> float:
    """CPU seconds to read the answers to ``calls`` with blocking ``recv_into`` on one
    keep-alive socket into a preallocated buffer: the kernel's copy, no HTTP library."""
    host, port = url.removeprefix("http://").split(":")
    cpu = 0.0
    buf = bytearray(1 << 20)
    with socket.create_connection((host, int(port))) as sock:
        for path, payload in calls:
            data = orjson.dumps(payload)
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(data)}\r\n\r\n").encode()
            sock.sendall(head + data)
            t = time.process_time()  # blocking waits for the engine cost no CPU
            n, end = 0, -1
            while end < 0:
                n += sock.recv_into(memoryview(buf)[n:])
                end = buf.find(b"\r\n\r\n", 0, n)
            length = next(int(line.split(b":")[1]) for line in bytes(buf[:end]).split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            total = end + 4 + length
            if len(buf) < total:
                buf.extend(bytes(total - len(buf)))
            view = memoryview(buf)
            while n < total:
                n += sock.recv_into(view[n:total])
            cpu += time.process_time() - t
            del view
    return cpu


def _payloads(engine: str, body: bytes) -> list[bytes]:
    # Parsing each body (rather than protocols.split_payloads) also leaves glibc's malloc with its
    # mmap/trim thresholds raised by the large freed strings; the floor and decode figures
    # below depend on that (vLLM wire: ~26 vs ~190 ns/token floor with a cold allocator).
    obj = orjson.loads(body)
    if engine == "vllm":
        return [c["routed_experts"].encode() for c in obj["choices"]]
    items = obj if isinstance(obj, list) else [obj]
    return [i["meta_info"]["routed_experts"].encode() for i in items]


def _cpu(fn: Any, *args: Any) -> float:
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


@dataclass(frozen=True)
class _Setup:
    """One benchmark's client settings against the running responder, and one transport per
    reader, kept for every round as ``collect`` keeps one for a whole run (its receive
    buffers stay warm after the first round)."""

    url: str
    engine: str
    geometry: RoutingGeometry
    params: SamplingParams
    concurrency: int
    transports: dict[str, HTTPTransport] = field(default_factory=dict)

    def client(self, reader: str = "buffer") -> RolloutClient:
        """A client reading answers with ``reader`` (the transport's ``buffer`` or
        ``aiohttp``)."""
        transport = self.transports.get(reader)
        if transport is None:
            transport = HTTPTransport(self.url, reader=reader)  # type: ignore[arg-type]
            self.transports[reader] = transport
        return RolloutClient(self.url, self.engine, self.geometry, params=self.params,
                             concurrency=self.concurrency, transport=transport)


READERS = ("buffer", "aiohttp")
"""The transport's readers, measured side by side: the first is the client's default."""


def _collect_round(setup: _Setup, prompts: list[Prompt], out: Path, r: int,
                   reader: str = "buffer") -> dict[str, Any]:
    """Round ``r``: the whole collection into ``out`` with ``reader``, timed (CPU of this
    process, wall)."""
    writer = ShardWriter(out, setup.geometry)

    async def go() -> Any:
        async with setup.client(reader) as client:
            return await collect(client, prompts, writer)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = asyncio.run(go())
    writer.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if summary.stored != len(prompts):
        raise RuntimeError(f"round {r}: {summary.stored} of {len(prompts)} stored: "
                           f"{summary.totals()}")
    return {"reader": reader, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
            "tokens": summary.tokens,
            "cpu_ns_per_token": cpu / summary.tokens * 1e9,
            "tokens_per_s": summary.tokens / wall}


def _receive_only(setup: _Setup, prompts: list[Prompt], reader: str = "buffer"
                  ) -> tuple[float, int]:
    """Receiving alone with ``reader``: the same requests, answers read and given back
    unread; (CPU s, body bytes)."""
    async def go() -> int:
        n = 0
        async with setup.client(reader) as client:
            sem = asyncio.Semaphore(setup.concurrency)

            async def one(p: Prompt) -> int:
                async with sem:
                    exchanges = await client.fetch(p)
                    size = sum(len(ex.body or b"") for ex in exchanges)
                    client.recycle(exchanges)
                    return size

            for size in await asyncio.gather(*(one(p) for p in prompts)):
                n += size
        return n

    c0 = time.process_time()
    body_bytes = asyncio.run(go())
    return time.process_time() - c0, body_bytes


def _fetch_bodies(setup: _Setup, prompts: list[Prompt]) -> list[tuple[dict[str, Any], bytes]]:
    """The requests for ``prompts`` and their answers, kept whole."""
    async def go() -> list[tuple[dict[str, Any], bytes]]:
        async with setup.client() as client:
            exchanges = await asyncio.gather(*(client.fetch(p) for p in prompts))
        return [(ex[0].call.payload, bytes(ex[0].body or b"")) for ex in exchanges]

    return asyncio.run(go())


def _floor_cpu(payloads: list[bytes]) -> tuple[float, float]:
    """CPU seconds (medians of 5) to b64-decode ``payloads``: results kept, and dropped."""
    def b64_floor() -> None:  # decode and keep, as ``bench ingest``'s floor
        decoded = [pybase64.b64decode(p, validate=True) for p in payloads]
        del decoded

    def b64_floor_discard() -> None:  # warm pages every time: a bound nothing reaches
        for p in payloads:
            pybase64.b64decode(p, validate=True)

    floor = statistics.median(_cpu(b64_floor) for _ in range(5))
    floor_discard = statistics.median(_cpu(b64_floor_discard) for _ in range(5))
    return floor, floor_discard


def _stage_cpu(engine: str, geometry: RoutingGeometry, bodies: list[tuple[dict[str, Any], bytes]],
               store_dir: Path) -> tuple[float, float, float]:
    """CPU seconds of the client's stages on ``bodies``, each on its own: decode and check
    (medians of 3), store (once)."""
    wires: list[Any] = []
    decode = statistics.median(_cpu(lambda: wires.__setitem__(slice(None), [
        w for i, (req, body) in enumerate(bodies)
        for w in decode_response(engine, req, body, geometry, f"s{i}")])) for _ in range(3))
    accepted: list[Any] = []
    check = statistics.median(_cpu(lambda: accepted.__setitem__(slice(None), [
        accept(w, geometry)[1] for w in wires])) for _ in range(3))

    def store() -> None:
        with ShardWriter(store_dir, geometry, resume=store_dir.exists()) as w:
            for s in accepted:
                w.add(s)

    return decode, check, _cpu(store)


def run(
    *, model: str, engine: str, prompts: int, prompt_len: int, max_new_tokens: int,
    concurrency: int, repeats: int, workdir: Path | None = None, floor_samples: int = 32,
) -> dict[str, Any]:
    """Run the benchmark (``repeats`` rounds of ``prompts`` prompts, one sample each, against a
    responder in another process) and return its figures."""
    geometry = RoutingGeometry.resolve(model)
    rng = np.random.default_rng(0)
    prompt_list = [Prompt(f"b{i:06d}", rng.integers(0, 50_000, prompt_len).tolist())
                   for i in range(prompts)]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    proc, url = start_responder("bench collect", engine, model)
    setup = _Setup(url, engine, geometry, params, concurrency)
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        # Interleaved: each round runs every reader, so a busy machine weighs on both alike.
        rounds = [_collect_round(setup, prompt_list, Path(tmp.name) / f"round-{r}-{reader}", r,
                                 reader)
                  for r in range(repeats) for reader in READERS]
        receive_cpu: dict[str, list[float]] = {reader: [] for reader in READERS}
        for _ in range(repeats):
            for reader in READERS:
                cpu, body_bytes = _receive_only(setup, prompt_list, reader)
                receive_cpu[reader].append(cpu)

        # The same answers again, kept whole, for the floor and the per-stage split.
        sub = prompt_list[:floor_samples]
        bodies = _fetch_bodies(setup, sub)
        raw_recv = statistics.median(_raw_receive_cpu(url, [(get_protocol(engine).path, req)
                                                            for req, _ in bodies])
                                     for _ in range(repeats))
        payloads = [p for _, body in bodies for p in _payloads(engine, body)]
        sub_tokens = sum(len(p.input_ids) + max_new_tokens for p in sub)
        floor, floor_discard = _floor_cpu(payloads)
        decode, check, stored = _stage_cpu(engine, geometry, bodies, Path(tmp.name) / "stages")
    finally:
        stop_responder(proc)
        tmp.cleanup()

    return _report(setup, model, prompts, prompt_len + max_new_tokens, _Measured(
        rounds, receive_cpu, body_bytes, raw_recv, payloads, sub_tokens, floor, floor_discard,
        decode, check, stored))


@dataclass(frozen=True)
class _Measured:
    """CPU seconds as measured; ``sub_tokens``: tokens of the samples the stages ran on."""

    rounds: list[dict[str, Any]]
    receive_cpu: dict[str, list[float]]
    body_bytes: int
    raw_recv: float
    payloads: list[bytes]
    sub_tokens: int
    floor: float
    floor_discard: float
    decode: float
    check: float
    stored: float


def _report(setup: _Setup, model: str, prompts: int, tokens_per_sample: int,
            m: _Measured) -> dict[str, Any]:
    """The figures, per token, from the measured CPU seconds."""
    rounds, sub_tokens = m.rounds, m.sub_tokens
    per_reader = {reader: statistics.median(x["cpu_ns_per_token"] for x in rounds
                                            if x["reader"] == reader) for reader in READERS}
    per_tok = per_reader[READERS[0]]
    floor_ns = m.floor / sub_tokens * 1e9
    discard_ns = m.floor_discard / sub_tokens * 1e9
    tokens_total = rounds[0]["tokens"]
    receive = {reader: statistics.median(cpu) / tokens_total * 1e9
               for reader, cpu in m.receive_cpu.items()}
    stages = {"receive": receive[READERS[0]],
              "decode": m.decode / sub_tokens * 1e9, "check": m.check / sub_tokens * 1e9,
              "store": m.stored / sub_tokens * 1e9}
    stages_sum = sum(stages.values())
    raw_ns = m.raw_recv / sub_tokens * 1e9
    wire_bytes = sum(len(p) for p in m.payloads) / sub_tokens
    return {
        "bench": "collect",
        "model": model,
        "geometry": setup.geometry.to_dict(),
        "engine": setup.engine,
        "prompts": prompts,
        "tokens_per_sample": tokens_per_sample,
        "concurrency": setup.concurrency,
        "routing_b64_bytes_per_token": round(wire_bytes, 1),
        "response_bytes_per_token": round(m.body_bytes / tokens_total, 1),
        "client_cpu_ns_per_token": round(per_tok, 1),
        "floor_b64decode_ns_per_token": round(floor_ns, 1),
        "ratio_client_vs_floor": round(per_tok / floor_ns, 2),
        "by_reader": {reader: {
            "client_cpu_ns_per_token": round(ns, 1),
            "ratio_client_vs_floor": round(ns / floor_ns, 2),
            "receive_ns_per_token": round(receive[reader], 1),
            "ratio_receive_vs_raw_socket": round(receive[reader] / raw_ns, 2)}
            for reader, ns in per_reader.items()},
        "floor_b64decode_discard_ns_per_token": round(discard_ns, 1),
        "ratio_client_vs_discard_floor": round(per_tok / discard_ns, 2),
        "stages_ns_per_token": {k: round(v, 1) for k, v in stages.items()},
        "stages_sum_ns_per_token": round(stages_sum, 1),
        "raw_socket_recv_ns_per_token": round(raw_ns, 1),
        "ratio_receive_vs_raw_socket": round(stages["receive"] / raw_ns, 2),
        "wall_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in rounds)),
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "compiled_checks": scan_is_compiled(),
        "client_cpu_us_per_sample": round(per_tok * tokens_per_sample / 1e3, 1),
        "note": "client CPU = time.process_time of the collecting process (all threads, kernel "
                "time included) over the whole collection, with the transport's default reader "
                "(by_reader: each reader, rounds interleaved, one transport per reader for every "
                "round, so the first round warms its buffers); the responder runs in another "
                "process. Floor = pybase64 b64decode (validate=True, results kept, as bench "
                "ingest) of the same payloads as bytes, on the first samples; the discard "
                "floor drops each result at once. Stages: receive = the same "
                "requests with answers read and dropped; decode, check, store measured offline "
                "on the first samples. Each stage is timed on its own (its own allocations and "
                "page faults), so their sum only approximates the whole collection's CPU. "
                "raw_socket_recv = blocking recv_into of the same answers into a preallocated "
                "buffer (the kernel's copy alone).",
    }

