"""One engine worker over HTTP: SGLang's ``/generate``, the OpenAI routes, health and info."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ._faults import WORKER_FAULTS, check_fault
from ._model import Generation, ModelRunner, SamplingSpec
from ._openai import chat_completion, completion
from ._pd_router import BOOTSTRAP_PORT
from ._worker import ROLES, Item, RequestError, Worker, WorkerConfig

__all__ = ["ROLES", "WorkerConfig", "make_worker_app"]

_WORKER = web.AppKey("worker", Worker)


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


async def _generate_stream(request: web.Request, w: Worker, item: Item) -> web.StreamResponse:
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
            chunk = {"text": w.runner.decode(partial.output_ids) or "",
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
    try:
        return _json(await completion(request.app[_WORKER], await _read_json(request)))
    except ValueError as e:
        return _error(str(e))


async def _chat_completions(request: web.Request) -> web.Response:
    try:
        return _json(await chat_completion(request.app[_WORKER], await _read_json(request)))
    except ValueError as e:
        return _error(str(e))


async def _health(_request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _health_generate(request: web.Request) -> web.Response:
    w = request.app[_WORKER]
    item = Item(rid="health", prompt=[0], spec=SamplingSpec(max_new_tokens=1, temperature=0.0),
                 start_len=0, return_routed=False, return_logprob=False)
    await w.run(item)
    return web.Response(status=200)


def _model_info(w: Worker) -> dict[str, Any]:
    g = w.runner.geometry
    return {
        "model_path": str(w.runner.model_dir),
        "tokenizer_path": str(w.runner.model_dir) if w.runner.tokenizer is not None else None,
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
        "dtype": w.runner.dtype,
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


def make_worker_app(runner: ModelRunner, config: WorkerConfig) -> web.Application:
    """The aiohttp application of one worker serving ``engine``."""
    check_fault(config.fault, WORKER_FAULTS, runner.geometry.top_k)
    if config.model_name is None:
        config.model_name = runner.model_dir.name
    app = web.Application(client_max_size=1 << 30)
    app[_WORKER] = Worker(runner, config)
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
