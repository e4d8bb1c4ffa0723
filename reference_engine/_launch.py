"""Start workers, routers and PD trios in-process, on free loopback ports.

Async context managers for code that runs an event loop, and :func:`in_background` to run one
on a private loop in a daemon thread for synchronous callers (tests, the demo)::

    with in_background(serve_pd(model_dir, dtype="float32")) as pd:
        requests.post(pd.router + "/generate", json=...)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncContextManager, TypeVar

from aiohttp import web

from ._pd_router import RouterConfig, make_router_app

if TYPE_CHECKING:
    from ._model import ModelRunner

__all__ = ["PDUrls", "in_background", "serve_app", "serve_pd", "serve_router", "serve_worker"]

T = TypeVar("T")


@dataclass(frozen=True)
class PDUrls:
    """Base URLs of a prefill worker, a decode worker and the router in front of them."""

    prefill: str
    decode: str
    router: str


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, host: str = "127.0.0.1",
                    port: int = 0) -> AsyncIterator[str]:
    """Serve an aiohttp app until the block exits; yields its base URL (port 0: a free one)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = bound_host if ":" not in bound_host else f"[{bound_host}]"
        yield f"http://{shown}:{bound_port}"
    finally:
        await runner.cleanup()


def _load_runner(model: str | Path | ModelRunner, dtype: str) -> ModelRunner:
    from ._model import ModelRunner

    return model if isinstance(model, ModelRunner) else ModelRunner(model, dtype=dtype)


@contextlib.asynccontextmanager
async def serve_worker(
    model: str | Path | ModelRunner,
    *,
    role: str = "unified",
    dtype: str = "bfloat16",
    fault: str | None = None,
    weight_version: str = "default",
    return_routed_experts: bool = True,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """One worker of ``role`` serving a model directory (or an already loaded
    :class:`~reference_engine.ModelRunner`).

    ``return_routed_experts=False`` serves like SGLang without
    ``--enable-return-routed-experts``: requests for routing get none, and no error.
    """
    from ._app import WorkerConfig, make_worker_app

    runner = await asyncio.to_thread(_load_runner, model, dtype)
    app = make_worker_app(runner, WorkerConfig(
        role=role, fault=fault, weight_version=weight_version,
        return_routed_experts=return_routed_experts))
    async with serve_app(app, host, port) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_router(prefill_url: str, decode_url: str, *, fault: str | None = None,
                       host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """A PD router in front of running prefill and decode workers."""
    app = make_router_app(RouterConfig(prefill_url, decode_url, fault=fault))
    async with serve_app(app, host, port) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_pd(
    model: str | Path | ModelRunner,
    *,
    dtype: str = "bfloat16",
    worker_fault: str | None = None,
    router_fault: str | None = None,
    weight_version: str = "default",
    share_model: bool = True,
    host: str = "127.0.0.1",
) -> AsyncIterator[PDUrls]:
    """A prefill worker, a decode worker and a router, each on a free port.

    ``worker_fault`` is injected by both workers, ``router_fault`` by the router. With
    ``share_model`` both workers use one loaded model (they still run as separate servers).
    """
    prefill_runner = await asyncio.to_thread(_load_runner, model, dtype)
    decode_runner = prefill_runner if share_model else await asyncio.to_thread(
        _load_runner, prefill_runner.model_dir, dtype)
    async with contextlib.AsyncExitStack() as stack:
        p = await stack.enter_async_context(serve_worker(
            prefill_runner, role="prefill", fault=worker_fault, weight_version=weight_version,
            host=host))
        d = await stack.enter_async_context(serve_worker(
            decode_runner, role="decode", fault=worker_fault, weight_version=weight_version,
            host=host))
        r = await stack.enter_async_context(serve_router(p, d, fault=router_fault, host=host))
        yield PDUrls(prefill=p, decode=d, router=r)


@contextlib.contextmanager
def in_background(acm: AsyncContextManager[T], *, timeout_s: float = 120.0) -> Iterator[T]:
    """Enter an async context manager on a private event loop in a daemon thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="replay-bridge-server", daemon=True)
    thread.start()
    try:
        value = asyncio.run_coroutine_threadsafe(acm.__aenter__(), loop).result(timeout_s)
        try:
            yield value
        finally:
            asyncio.run_coroutine_threadsafe(
                acm.__aexit__(None, None, None), loop).result(timeout_s)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        loop.close()

