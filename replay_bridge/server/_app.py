"""One engine worker over HTTP: SGLang's ``/generate``, ``/v1/completions`` and health routes.

A worker has a role. ``unified`` runs the whole request. In PD disaggregation, ``prefill`` runs
the prompt and samples the first token, returning the prompt rows; ``decode`` never records the
prompt forward (in SGLang it receives the KV cache instead), so its prompt rows stay the zeros
of a fresh capture buffer; it returns no ``routed_experts`` when the first token already
finished the request. Both workers of one request derive the sampling seed from
``bootstrap_room`` so they produce the same tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from ._encoding import BOOTSTRAP_PORT, encode_int32
from ._faults import WORKER_FAULTS, apply_rows_fault, check_fault, stale_rows
from ._model import Engine, Generation, SamplingSpec

__all__ = ["ROLES", "RequestError", "WorkerConfig", "make_worker_app"]

ROLES = ("unified", "prefill", "decode")
_MAX_SEED = 2**63


class RequestError(ValueError):
    """A request the worker refuses (HTTP 400)."""


@dataclass
class WorkerConfig:
    """What distinguishes one worker from another serving the same model."""

    role: str = "unified"
    fault: str | None = None
    weight_version: str = "default"
    model_name: str | None = None
    return_routed_experts: bool = True  # SGLang's --enable-return-routed-experts

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass
class _Item:
    """One sequence of a (possibly batched) request."""

    rid: str
    prompt: list[int]
    spec: SamplingSpec
    start_len: int
    return_routed: bool
    return_logprob: bool
    logprob_start: int = 0
    prompt_from_text: bool = False


@dataclass
class _Worker:
    engine: Engine
    config: WorkerConfig
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    )
    last_routing: Any = None  # the previous request's capture (for stale-prompt-rows)

    # ---- one sequence --------------------------------------------------------------------

    async def run(self, item: _Item, on_token: Any = None) -> Generation:
        """Generate one sequence in the engine thread.

        The weight version in force when each token was sampled is recorded, so a version
        update during generation splits ``weight_versions`` into spans.
        """
        role = self.config.role
        spec = item.spec
        if role == "prefill":
            spec = replace(spec, max_new_tokens=min(spec.max_new_tokens, 1))
        versions: list[str] = []

        def token(tok: int, lp: float) -> None:
            versions.append(self.config.weight_version)
            if on_token is not None:
                on_token(tok, lp)

        loop = asyncio.get_running_loop()
        gen = await loop.run_in_executor(
            self.executor,
            lambda: self.engine.generate(
                item.prompt, spec, capture_prompt=role != "decode", on_token=token,
                # A decode worker never ran the prompt: it has no prompt log-probs.
                input_logprob_start=item.logprob_start
                if item.return_logprob and role != "decode" else None),
        )
        gen.extra["versions"] = versions
        gen.extra["earlier_routing"], self.last_routing = self.last_routing, gen.routing
        return gen

    def meta_info(self, item: _Item, gen: Generation, *, final: bool = True) -> dict[str, Any]:
        n_out = len(gen.output_ids)
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": gen.finish_reason if final else None,
            "prompt_tokens": gen.prompt_len,
            "completion_tokens": n_out,
            "cached_tokens": 0,
            "weight_version": self.config.weight_version,
            "weight_versions": _spans(gen.extra.get("versions"), n_out,
                                      self.config.weight_version),
            "e2e_latency": gen.latency_s,
        }
        if item.return_logprob:
            inputs = gen.extra.get("input_logprobs") or []
            meta["input_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(inputs, item.prompt[item.logprob_start:])
            ]
            meta["output_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(gen.logprobs, gen.output_ids)
            ]
        if final and self._returns_routing(item, gen):
            rows = gen.routing[item.start_len :]
            prompt_rows = gen.prompt_len - item.start_len
            if self.config.fault == "stale-prompt-rows":
                rows = stale_rows(rows, prompt_rows, gen.extra.get("earlier_routing"))
            rows = apply_rows_fault(self.config.fault, rows, prompt_rows,
                                    self.engine.geometry.moe_layers)
            meta["routed_experts"] = encode_int32(rows)
        return meta

    def _returns_routing(self, item: _Item, gen: Generation) -> bool:
        if not (item.return_routed and self.config.return_routed_experts):
            return False
        if self.config.fault == "drop-routed-experts":
            return False
        # Decode's quick-finish case: prefill's first token already ended the request.
        return not (self.config.role == "decode" and len(gen.output_ids) <= 1)

    def body(self, item: _Item, gen: Generation) -> dict[str, Any]:
        out: dict[str, Any] = {}
        text = self.engine.decode(gen.output_ids)
        if text is not None:
            out["text"] = text
        out["output_ids"] = list(gen.output_ids)
        out["meta_info"] = self.meta_info(item, gen)
        if item.prompt_from_text:
            out["prompt_token_ids"] = list(item.prompt)
        return out

    # ---- parsing -------------------------------------------------------------------------

    def items(self, body: dict[str, Any]) -> tuple[list[_Item], bool]:
        """The request's sequences, and whether it was batched (list input)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        text, ids = body.get("text"), body.get("input_ids")
        if ids is not None:
            if not isinstance(ids, list) or not ids:
                raise RequestError("input_ids must be a non-empty list")
            batched = isinstance(ids[0], list)
            prompts = ids if batched else [ids]
            from_text = False
        elif text is not None:
            batched = isinstance(text, list)
            texts = text if batched else [text]
            if not all(isinstance(t, str) for t in texts):
                raise RequestError("text must be a string or a list of strings")
            try:
                prompts = [self.engine.encode(t) for t in texts]
            except ValueError as e:
                raise RequestError(str(e)) from None
            from_text = True
        else:
            raise RequestError("the request needs input_ids or text")
        n = len(prompts)
        sps = _per_item(body.get("sampling_params") or {}, n, "sampling_params")
        rids = _per_item(body.get("rid"), n, "rid")
        rooms = _per_item(body.get("bootstrap_room"), n, "bootstrap_room")
        logprob = _per_item(body.get("return_logprob", False), n, "return_logprob")
        lp_start = body.get("logprob_start_len", -1)
        if not isinstance(lp_start, int) or isinstance(lp_start, bool) or lp_start < -1:
            raise RequestError(f"logprob_start_len must be an integer >= -1, got {lp_start!r}")
        start = body.get("routed_experts_start_len", 0) or 0
        if not isinstance(start, int) or isinstance(start, bool):
            raise RequestError(f"routed_experts_start_len must be an integer, got {start!r}")
        items = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not prompt or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise RequestError(f"item {i}: input_ids must be a non-empty list of integers")
            if not 0 <= start <= len(prompt):
                raise RequestError(
                    f"item {i}: routed_experts_start_len={start} must be in "
                    f"[0, prompt_len={len(prompt)}]"
                )
            if lp_start >= len(prompt):
                raise RequestError(f"item {i}: logprob_start_len={lp_start} must be below "
                                   f"prompt_len={len(prompt)}")
            spec = _spec(sps[i], i)
            spec = replace(spec, seed=self._seed(spec.seed, rooms[i], prompt, sps[i]))
            items.append(_Item(
                rid=str(rids[i]) if rids[i] is not None else uuid.uuid4().hex,
                prompt=prompt,
                spec=spec,
                start_len=start,
                return_routed=bool(body.get("return_routed_experts", False)),
                return_logprob=bool(logprob[i]),
                # SGLang's default -1: the last prompt token only.
                logprob_start=len(prompt) - 1 if lp_start == -1 else lp_start,
                prompt_from_text=from_text,
            ))
        return items, batched

    def _seed(self, explicit: int | None, room: Any, prompt: list[int],
              sampling_params: dict[str, Any]) -> int | None:
        """The sampling seed: explicit, else from ``bootstrap_room`` (shared by both PD workers),
        else, on a PD worker, from the request content, else none (fresh randomness)."""
        if explicit is not None:
            return explicit % _MAX_SEED
        if room is not None:
            return int(room) % _MAX_SEED
        if self.config.role != "unified":
            digest = hashlib.sha256(orjson.dumps([prompt, sampling_params],
                                                 option=orjson.OPT_SORT_KEYS)).digest()
            return int.from_bytes(digest[:8], "little") % _MAX_SEED
        return None


def _spans(versions: list[str] | None, n_out: int, current: str) -> list[dict[str, Any]]:
    """Run-length spans ``{"version", "start", "end"}`` over the output tokens."""
    if not versions or len(versions) != n_out:
        return [{"version": current, "start": 0, "end": n_out}]
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    """A per-request field: a list gives one value per prompt, anything else applies to all."""
    if isinstance(value, list):
        if len(value) != n:
            raise RequestError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _spec(sp: Any, i: int) -> SamplingSpec:
    if not isinstance(sp, dict):
        raise RequestError(f"item {i}: sampling_params must be an object")
    try:
        stop_ids = sp.get("stop_token_ids") or ()
        seed = sp.get("sampling_seed", sp.get("seed"))
        spec = SamplingSpec(
            max_new_tokens=int(sp.get("max_new_tokens", 128)),
            temperature=float(sp.get("temperature", 1.0)),
            top_p=float(sp.get("top_p", 1.0)),
            top_k=int(sp.get("top_k", -1)),
            stop_token_ids=tuple(int(t) for t in stop_ids),
            ignore_eos=bool(sp.get("ignore_eos", False)),
            seed=None if seed is None else int(seed),
        )
    except (TypeError, ValueError) as e:
        raise RequestError(f"item {i}: bad sampling_params: {e}") from None
    if spec.max_new_tokens < 0:
        raise RequestError(f"item {i}: max_new_tokens must be >= 0")
    if spec.temperature < 0 or not 0 < spec.top_p <= 1:
        raise RequestError(f"item {i}: temperature must be >= 0 and top_p in (0, 1]")
    return spec


# ---- HTTP ------------------------------------------------------------------------------------

_WORKER = web.AppKey("worker", _Worker)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(message: str, status: int = 400) -> web.Response:
    return _json({"error": {"message": message, "code": status}}, status)


async def _read_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the request body is not JSON: {e}") from None


async def _generate(request: web.Request) -> web.StreamResponse:
    w = request.app[_WORKER]
    try:
        body = await _read_json(request)
        items, batched = w.items(body)
        if body.get("stream"):
            if batched:
                raise RequestError("streaming a batched request is not supported")
            return await _generate_stream(request, w, items[0])
        gens = await asyncio.gather(*(w.run(it) for it in items))
    except (RequestError, ValueError) as e:
        return _error(str(e))
    outs = [w.body(it, g) for it, g in zip(items, gens)]
    return _json(outs if batched else outs[0])


async def _generate_stream(request: web.Request, w: _Worker, item: _Item) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    task = asyncio.ensure_future(
        w.run(item, on_token=lambda t, lp: loop.call_soon_threadsafe(queue.put_nowait, (t, lp)))
    )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    partial = Generation(prompt_len=len(item.prompt), output_ids=[], logprobs=[],
                         routing=None, finish_reason={})  # type: ignore[arg-type]
    pending: tuple[int, float] | None = None

    async def send(obj: Any) -> None:
        await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    while not (task.done() and queue.empty()):
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            continue
        if pending is not None:  # hold one token back: the last one goes out with the final chunk
            partial.output_ids.append(pending[0])
            partial.logprobs.append(pending[1])
            chunk = {"text": w.engine.decode(partial.output_ids) or "",
                     "output_ids": list(partial.output_ids),
                     "meta_info": w.meta_info(item, partial, final=False)}
            await send(chunk)
        pending = getter.result()
    try:
        gen = task.result()
    except ValueError as e:
        await send({"error": {"message": str(e), "code": 400}})
    else:
        await send(w.body(item, gen))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _completions(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    try:
        body = await _read_json(request)
        return await _openai(w, body, chat=False)
    except (RequestError, ValueError) as e:
        return _error(str(e))


async def _chat_completions(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    try:
        body = await _read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise RequestError("a chat request needs a list of messages")
        prompt = w.engine.chat_prompt(body["messages"])
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
            body["max_tokens"] = body["max_completion_tokens"]
        if body.get("logprobs") is False:
            body["logprobs"] = None
        return await _openai(w, {**body, "prompt": prompt}, chat=True)
    except (RequestError, ValueError) as e:
        return _error(str(e))


async def _openai(w: _Worker, body: dict[str, Any], *, chat: bool) -> web.Response:
    """An OpenAI-style (chat) completion: one ``/generate`` item per prompt and choice."""
    if body.get("stream"):
        raise RequestError("streaming OpenAI-style requests are not supported by this engine")
    gen_body, n, n_prompts = _completion_to_generate(body)
    items, _ = w.items(gen_body)
    gens = await asyncio.gather(*(w.run(it) for it in items))
    rets = [w.body(it, g) for it, g in zip(items, gens)]
    want_logprobs = body.get("logprobs") is not None
    choices = []
    for idx, ret in enumerate(rets):
        meta = ret["meta_info"]
        finish = meta["finish_reason"] or {}
        choice: dict[str, Any] = {"index": idx}
        if chat:
            choice["message"] = {"role": "assistant", "content": ret.get("text", "")}
            choice["logprobs"] = _chat_logprobs(w.engine, ret) if want_logprobs else None
        else:
            choice["text"] = ret.get("text", "")
            choice["logprobs"] = _openai_logprobs(w.engine, ret) if want_logprobs else None
        choice["finish_reason"] = finish.get("type")
        choice["matched_stop"] = finish.get("matched")
        if body.get("return_token_ids"):
            choice["token_ids"] = ret["output_ids"]
        if body.get("return_meta_info"):
            choice["meta_info"] = meta
        choices.append(choice)
    prompt_tokens = sum(len(items[i * n].prompt) for i in range(n_prompts))
    completion_tokens = sum(r["meta_info"]["completion_tokens"] for r in rets)
    out: dict[str, Any] = {
        "id": rets[0]["meta_info"]["id"],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or w.config.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "metadata": {"weight_version": w.config.weight_version},
    }
    if body.get("return_token_ids"):
        out["prompt_token_ids"] = items[0].prompt if n_prompts == 1 else [
            items[i * n].prompt for i in range(n_prompts)]
    first = rets[0]["meta_info"].get("routed_experts")
    if first is not None:  # response level: the first choice's routing only (as SGLang)
        out["sglext"] = {"routed_experts": first}
    return _json(out)


def _completion_to_generate(body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    """Translate an OpenAI completion request into a batched ``/generate`` body."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    n = int(body.get("n", 1) or 1)
    if n < 1:
        raise RequestError("n must be >= 1")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and isinstance(prompt[0], int)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a list of those")
    expanded = [p for p in prompts for _ in range(n)]
    if any(isinstance(p, str) for p in expanded):
        if not all(isinstance(p, str) for p in expanded):
            raise RequestError("mixing text and token-id prompts is not supported")
        key, value = "text", expanded
    else:
        key, value = "input_ids", expanded
    seed = body.get("seed")
    room = body.get("bootstrap_room")
    if isinstance(room, list):
        room = room[0] if room else None
    sps = []
    for i in range(len(expanded)):
        sp = {
            "max_new_tokens": _get(body, "max_tokens", 16),
            "temperature": _get(body, "temperature", 1.0),
            "top_p": _get(body, "top_p", 1.0),
            "top_k": _get(body, "top_k", -1),
            "stop_token_ids": body.get("stop_token_ids") or [],
            "ignore_eos": bool(body.get("ignore_eos", False)),
        }
        # Distinct seeds per choice that both PD workers agree on.
        if seed is not None:
            sp["sampling_seed"] = int(seed) + i
        elif room is not None:
            sp["sampling_seed"] = int(room) + i
        sps.append(sp)
    gen: dict[str, Any] = {
        key: value,
        "sampling_params": sps,
        "return_logprob": body.get("logprobs") is not None,
        "return_routed_experts": bool(body.get("return_routed_experts", False)),
        "routed_experts_start_len": body.get("routed_experts_start_len", 0),
    }
    if body.get("rid") is not None:
        gen["rid"] = body["rid"]
    return gen, n, len(prompts)


def _get(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _chat_logprobs(engine: Engine, ret: dict[str, Any]) -> dict[str, Any]:
    pairs = ret["meta_info"].get("output_token_logprobs") or []
    return {"content": [{"token": engine.token_text(tok) or str(tok), "logprob": lp,
                         "bytes": None, "top_logprobs": []} for lp, tok, _ in pairs]}


def _openai_logprobs(engine: Engine, ret: dict[str, Any]) -> dict[str, Any]:
    pairs = ret["meta_info"].get("output_token_logprobs") or []
    tokens = [engine.token_text(tok) or str(tok) for _, tok, _ in pairs]
    offsets, acc = [], 0
    for t in tokens:
        offsets.append(acc)
        acc += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in pairs],
            "top_logprobs": [None] * len(tokens), "text_offset": offsets}


async def _health(_request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _health_generate(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    item = _Item(rid="health", prompt=[0], spec=SamplingSpec(max_new_tokens=1, temperature=0.0),
                 start_len=0, return_routed=False, return_logprob=False)
    await w.run(item)
    return web.Response(status=200)


def _model_info(w: _Worker) -> dict[str, Any]:
    g = w.engine.geometry
    return {
        "model_path": str(w.engine.model_dir),
        "tokenizer_path": str(w.engine.model_dir) if w.engine.tokenizer is not None else None,
        "is_generation": True,
        "weight_version": w.config.weight_version,
        "routed_experts_geometry": {"num_layers": g.num_layers, "moe_layers": list(g.moe_layers),
                                    "top_k": g.top_k, "num_experts": g.num_experts},
    }


async def _get_model_info(request: web.Request) -> web.Response:
    return _json(_model_info(request.app[_WORKER]))


async def _get_server_info(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    role = w.config.role
    return _json({
        **_model_info(w),
        "served_model_name": w.config.model_name,
        "dtype": w.engine.dtype,
        "disaggregation_mode": "null" if role == "unified" else role,
        "disaggregation_bootstrap_port": BOOTSTRAP_PORT,
        "enable_return_routed_experts": w.config.return_routed_experts,
        "fault": w.config.fault,
        "engine": "replay-bridge reference engine (transformers)",
        "internal_states": [{"last_gen_throughput": 0.0, "avg_spec_accept_length": None}],
    })


async def _models(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    return _json({"object": "list", "data": [
        {"id": w.config.model_name, "object": "model", "owned_by": "replay-bridge",
         "root": w.config.model_name}]})


async def _update_weight_version(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    try:
        body = await _read_json(request)
        w.config.weight_version = str(body["new_version"])
    except (RequestError, KeyError, TypeError) as e:
        return _error(f"expected {{\"new_version\": ...}}: {e}")
    return _json({"success": True, "message": f"weight version is {w.config.weight_version}"})


async def _flush_cache(_request: web.Request) -> web.Response:
    return web.Response(status=200, text="Cache flushed.\n")


async def _shutdown_executor(app: web.Application) -> None:
    app[_WORKER].executor.shutdown(wait=False, cancel_futures=True)


def make_worker_app(engine: Engine, config: WorkerConfig) -> web.Application:
    """The aiohttp application of one worker serving ``engine``."""
    check_fault(config.fault, WORKER_FAULTS, engine.geometry.top_k)
    if config.model_name is None:
        config.model_name = engine.model_dir.name
    app = web.Application(client_max_size=1 << 30)
    app[_WORKER] = _Worker(engine, config)
    app.on_cleanup.append(_shutdown_executor)
    app.router.add_post("/generate", _generate)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/health", _health)
    app.router.add_get("/health_generate", _health_generate)
    app.router.add_get("/get_model_info", _get_model_info)
    app.router.add_get("/model_info", _get_model_info)
    app.router.add_get("/get_server_info", _get_server_info)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/update_weight_version", _update_weight_version)
    app.router.add_post("/flush_cache", _flush_cache)
    return app
