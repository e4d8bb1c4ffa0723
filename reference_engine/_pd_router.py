"""The PD router: sends each request to a prefill and a decode worker and merges like SGLang.

Like SGLang's mini load balancer it adds ``bootstrap_host`` / ``bootstrap_port`` /
``bootstrap_room`` (one per item for a batched request) and sends the same body to both workers
at once. Then, like SGLang's gateway with routed-experts support, it merges a non-streaming,
single-sequence response by byte splice: prefill's bytes, then decode's bytes past prefill's
length; prefill's value as is when decode sent none (the quick-finish case). Streaming and
batched requests get decode's response, unmerged.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import get_protocol, splice_routing

from ._faults import ROUTER_FAULTS, apply_rows_fault, check_fault

__all__ = ["BOOTSTRAP_PORT", "RouterConfig", "make_router_app"]

# The bootstrap_port a PD router adds to requests (SGLang's default disaggregation port).
BOOTSTRAP_PORT = 8998
SGLANG = get_protocol("sglang")

_STREAM_CHUNK = 64 * 1024


@dataclass
class RouterConfig:
    prefill_url: str
    decode_url: str
    fault: str | None = None
    bootstrap_port: int = BOOTSTRAP_PORT
    request_timeout_s: float | None = None


@dataclass
class _Router:
    config: RouterConfig
    session: aiohttp.ClientSession | None = None
    geometry: RoutingGeometry | None = field(default=None)

    @property
    def prefill(self) -> str:
        return self.config.prefill_url.rstrip("/")

    @property
    def decode(self) -> str:
        return self.config.decode_url.rstrip("/")

    def with_bootstrap(self, body: dict[str, Any], batch: int | None) -> dict[str, Any]:
        host = urllib.parse.urlparse(self.prefill).hostname or "127.0.0.1"
        out = dict(body)
        if batch is None:
            out.update(bootstrap_host=host, bootstrap_port=self.config.bootstrap_port,
                       bootstrap_room=random.randint(0, 2**63 - 1))
        else:
            out.update(bootstrap_host=[host] * batch,
                       bootstrap_port=[self.config.bootstrap_port] * batch,
                       bootstrap_room=[random.randint(0, 2**63 - 1) for _ in range(batch)])
        if self.config.fault == "drop-routed-experts":
            out.pop("return_routed_experts", None)
        return out

    async def routing_geometry(self) -> RoutingGeometry:
        if self.geometry is None:
            assert self.session is not None
            async with self.session.get(f"{self.prefill}/get_model_info") as r:
                info = (await r.json())["routed_experts_geometry"]
            self.geometry = RoutingGeometry.from_dict(info)
        return self.geometry

    async def fault_value(self, value: str, prompt_rows: int) -> str:
        """Apply a rows-level fault to one base64 routing value."""
        geometry = await self.routing_geometry()
        rows = SGLANG.decode_routing(value, geometry)
        return SGLANG.encode_routing(apply_rows_fault(self.config.fault, rows, prompt_rows,
                                                      geometry.moe_layers))


def _batch_size(body: dict[str, Any]) -> int | None:
    """As SGLang's mini load balancer: a list of texts or of id lists is a batch."""
    text = body.get("text")
    if text is not None:
        return None if isinstance(text, str) else len(text)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids:
        return None if isinstance(ids[0], int) else len(ids)
    return None


def _merge_meta(prefill_meta: dict[str, Any] | None, decode_meta: dict[str, Any]) -> None:
    if prefill_meta is None:
        return
    p = prefill_meta.get("routed_experts")
    d = decode_meta.get("routed_experts")
    if p is not None and d is not None:
        decode_meta["routed_experts"] = splice_routing(p, d)
    elif p is not None:
        decode_meta["routed_experts"] = p


_ROUTER = web.AppKey("router", _Router)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def _post_both(r: _Router, endpoint: str, body: dict[str, Any]
                     ) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    assert r.session is not None

    async def post(url: str) -> tuple[int, bytes]:
        try:
            async with r.session.post(f"{url}/{endpoint}", data=orjson.dumps(body),
                                      headers={"Content-Type": "application/json"}) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as e:
            message = f"worker {url} did not answer /{endpoint}: {type(e).__name__}: {e}"
            return 502, orjson.dumps({"error": {"message": message, "code": 502}})

    p, d = await asyncio.gather(post(r.prefill), post(r.decode))
    return p, d


async def _stream(request: web.Request, r: _Router, endpoint: str,
                  body: dict[str, Any]) -> web.StreamResponse:
    """Forward a streaming request to both; relay decode's stream untouched."""
    assert r.session is not None
    payload = orjson.dumps(body)
    headers = {"Content-Type": "application/json"}

    async def drain_prefill() -> None:
        async with r.session.post(f"{r.prefill}/{endpoint}", data=payload, headers=headers) as p:
            await p.read()

    prefill_task = asyncio.ensure_future(drain_prefill())
    try:
        async with r.session.post(f"{r.decode}/{endpoint}", data=payload, headers=headers) as d:
            resp = web.StreamResponse(status=d.status, headers={
                "Content-Type": d.headers.get("Content-Type", "text/event-stream")})
            await resp.prepare(request)
            async for chunk in d.content.iter_chunked(_STREAM_CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
    finally:
        await prefill_task
    return resp


async def _read_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The request body as a JSON object, or the 400 response that says why it is not one."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        return _json({"error": {"message": f"the request body is not JSON: {e}"}}, 400)
    if not isinstance(body, dict):
        return _json({"error": {"message": "the request body must be a JSON object"}}, 400)
    return body


def _failed(status: int, raw: bytes) -> web.Response | None:
    """A worker's error answer, passed through as it came."""
    if status == 200:
        return None
    return web.Response(body=raw, status=status, content_type="application/json")


async def _generate(request: web.Request) -> web.StreamResponse:
    r = request.app[_ROUTER]
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    batch = _batch_size(body)
    sent = r.with_bootstrap(body, batch)
    if body.get("stream"):
        return await _stream(request, r, "generate", sent)
    (p_status, p_raw), (d_status, d_raw) = await _post_both(r, "generate", sent)
    failed = _failed(p_status, p_raw) or _failed(d_status, d_raw)
    if failed is not None:
        return failed
    out = orjson.loads(d_raw)
    if batch is None and r.config.fault != "no-merge":
        _merge_meta(orjson.loads(p_raw).get("meta_info"), out["meta_info"])
    start = int(SGLANG.requested_start(body))
    for item in out if isinstance(out, list) else [out]:
        await _apply_fault(r, item.get("meta_info") or {}, start)
    return _json(out)


async def _apply_fault(r: _Router, meta: dict[str, Any], start_len: int,
                       prompt_tokens: int | None = None) -> None:
    """Apply the router's fault to the ``routed_experts`` of one ``meta_info`` (or ``sglext``)."""
    value = meta.get("routed_experts")
    if value is None:
        return
    if r.config.fault == "drop-routed-experts":
        del meta["routed_experts"]
    elif r.config.fault in ("prefill-zero-rows", "duplicate-ids", "extra-row"):
        n_prompt = int(meta.get("prompt_tokens", 0) if prompt_tokens is None else prompt_tokens)
        meta["routed_experts"] = await r.fault_value(value, n_prompt - start_len)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, request.path.lstrip("/"))


async def _openai(request: web.Request, endpoint: str) -> web.StreamResponse:
    r = request.app[_ROUTER]
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    sent = r.with_bootstrap(body, None)
    if body.get("stream"):
        return await _stream(request, r, endpoint, sent)
    (p_status, p_raw), (d_status, d_raw) = await _post_both(r, endpoint, sent)
    failed = _failed(p_status, p_raw) or _failed(d_status, d_raw)
    if failed is not None:
        return failed
    out = orjson.loads(d_raw)
    prefill = orjson.loads(p_raw)
    start = int(SGLANG.requested_start(body))
    if r.config.fault != "no-merge":
        ext = out.setdefault("sglext", {})
        _merge_meta(prefill.get("sglext") or {}, ext)
        if not ext:
            del out["sglext"]
        for pc, dc in zip(prefill.get("choices", []), out.get("choices", [])):
            if "meta_info" in dc:
                _merge_meta(pc.get("meta_info"), dc["meta_info"])
    ext = out.get("sglext")
    if ext is not None and ext.get("routed_experts") is not None:
        choices = out.get("choices") or [{}]
        prompt_tokens = (choices[0].get("meta_info") or {}).get(
            "prompt_tokens", (out.get("usage") or {}).get("prompt_tokens", 0))
        await _apply_fault(r, ext, start, prompt_tokens)
        if not ext:
            del out["sglext"]
    for c in out.get("choices", []):
        if "meta_info" in c:
            await _apply_fault(r, c["meta_info"], start)
    return _json(out)


async def _health(request: web.Request) -> web.Response:
    r = request.app[_ROUTER]
    assert r.session is not None
    try:
        for url in (r.prefill, r.decode):
            async with r.session.get(f"{url}/health") as resp:
                if resp.status != 200:
                    return web.Response(status=503, text=f"{url} is unhealthy\n")
    except aiohttp.ClientError as e:
        return web.Response(status=503, text=f"a worker is unreachable: {e}\n")
    return web.Response(status=200)


async def _proxy_prefill_get(request: web.Request) -> web.Response:
    r = request.app[_ROUTER]
    assert r.session is not None
    async with r.session.get(f"{r.prefill}{request.path}") as resp:
        return web.Response(body=await resp.read(), status=resp.status,
                            content_type=resp.content_type)


async def _open(app: web.Application) -> None:
    r = app[_ROUTER]
    timeout = aiohttp.ClientTimeout(total=r.config.request_timeout_s)
    r.session = aiohttp.ClientSession(timeout=timeout)


async def _close(app: web.Application) -> None:
    r = app[_ROUTER]
    if r.session is not None:
        await r.session.close()


def make_router_app(config: RouterConfig) -> web.Application:
    """The aiohttp application of a PD router in front of one prefill and one decode worker."""
    check_fault(config.fault, ROUTER_FAULTS)
    app = web.Application(client_max_size=1 << 30)
    app[_ROUTER] = _Router(config)
    app.on_startup.append(_open)
    app.on_cleanup.append(_close)
    app.router.add_post("/generate", _generate)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _completions)
    app.router.add_get("/health", _health)
    for path in ("/get_model_info", "/model_info", "/get_server_info", "/v1/models"):
        app.router.add_get(path, _proxy_prefill_get)
    return app
